"""Hostile inputs: the classes of bytes, JSON and paths a file from the internet can hold, built
from a valid safetensors file and config.json. Used by the fuzz campaign
(:mod:`exl2.conformance.fuzz`) and by the tests of the reader, the validator and the CLI.

Each builder returns the bytes of a whole ``.safetensors`` file (or the text of a config.json)
that differs from the valid one in one hostile way:

- raw JSON the strict parser must refuse without an internal error or unbounded memory: nesting
  200,000 deep, a 5000-digit integer (beyond Python's int conversion limit), ``NaN`` and
  ``Infinity``, a header that is not UTF-8 (invalid bytes, overlong forms, encoded surrogates,
  a byte-order mark), names given twice, a header of millions of empty objects;
- a value of every JSON type (and huge, negative, fractional, deeply nested, surrogate and
  markup strings) at every field of the header and of config.json (:data:`JSON_VALUES`);
- tensor names holding lone surrogates, NUL and other controls, terminal escapes or rich markup;
- odd paths: folder and shard names with markup, spaces, line breaks, undecodable bytes.
"""

from __future__ import annotations

import json
import os
import random
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

#: Replaced in serialized JSON by raw text (a token no real header holds).
SENTINEL = "\x00@hostile@\x00"

#: JSON values of every type, written as JSON text: each is tried at every field.
JSON_VALUES: tuple[str, ...] = (
    "null", "true", "false", "0", "-1", "1.5", "-0.0", "1e308", "1e999", "18446744073709551616",
    "1" + "0" * 30, '""', '"F16"', '"x"', '"[/]"', '"[bold red]x[/]"', r'"\ud800"', r'"\u0000"', r'"\u001b[31m"',
    "[]", "{}", "[[]]", "[1, 2]", '{"a": {}}', '["F16"]', "[" * 50 + "]" * 50, "[" * 900 + "]" * 900,
)
#: Raw JSON text no strict parser accepts, tried at every field too (the last one is a real lone
#: surrogate, written as the invalid UTF-8 bytes ``surrogatepass`` gives).
RAW_VALUES: tuple[str, ...] = ("NaN", "Infinity", "-Infinity", "1" + "0" * 4999, "[" * 200_000 + "]" * 200_000,
                               '"\ud800"')
#: Tensor names that stress printing and parsing (markup and spaces are legal; controls and lone
#: surrogates are not).
NAMES: tuple[str, ...] = ("[/]", "[bold red]x[/bold red]", "a b", "\u202eevil", "\x00", "a\x00b", "x\ny", "\x1b[31mred",
                          "\ud800", "x\udcff", "\x7f", "\x85", "", "é中", "." * 300)
#: Folder and shard names that stress printing and path handling (markup cannot close with
#: ``[/]`` in a name, which holds no slash; undecodable bytes come from ``os.fsdecode`` of raw
#: bytes, as a file system hands them over).
PATH_NAMES: tuple[str, ...] = ("[red]x", "[bold]", "[link=x]y", "a b", "-rf", "x\ny", "tab\tname", "\u202eevil", "é中",
                               os.fsdecode(b"bad\xff\xfe"), "~user", "$HOME", "%s%n", "a" * 200)


def split(data: bytes) -> tuple[dict, bytes]:
    """The header (parsed) and the data bytes of a valid safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header_text: bytes, body: bytes) -> bytes:
    """A safetensors file from raw header bytes and data bytes."""
    return struct.pack("<Q", len(header_text)) + header_text + body


def with_raw(header: dict, body: bytes, raw: str) -> bytes:
    """``header`` serialized with the :data:`SENTINEL` string replaced by ``raw`` JSON text."""
    text = json.dumps(header).replace(json.dumps(SENTINEL), raw)
    return join(text.encode("utf-8", "surrogatepass"), body)


def header_fields(header: dict, name: str) -> list[tuple[str, Callable[[dict, object], None]]]:
    """Every field of the header around tensor ``name``: (label, setter)."""
    def set_root(h, v):
        h.clear()
        h["@root"] = v  # replaced below: the whole header becomes the value

    def entry(key):
        def setter(h, v):
            h[name][key] = v
        return setter

    def item(key, i):
        def setter(h, v):
            h[name][key][i] = v
        return setter

    def set_meta(h, v):
        h["__metadata__"] = v

    def set_meta_value(h, v):
        h["__metadata__"] = {"format": v}

    def set_entry(h, v):
        h[name] = v

    fields = [("entry", set_entry), ("dtype", entry("dtype")), ("shape", entry("shape")),
              ("data_offsets", entry("data_offsets")), ("data_offsets[0]", item("data_offsets", 0)),
              ("data_offsets[1]", item("data_offsets", 1)), ("__metadata__", set_meta),
              ("__metadata__.format", set_meta_value), ("root", set_root)]
    if header[name]["shape"]:
        fields.append(("shape[0]", item("shape", 0)))
    return fields


def wrong_value(data: bytes, name: str, field: str, raw: str) -> bytes:
    """The file ``data`` with ``field`` of tensor ``name`` (see :func:`header_fields`) set to the
    raw JSON text ``raw``."""
    header, body = split(data)
    setter = dict(header_fields(header, name))[field]
    setter(header, SENTINEL)
    if field == "root":
        return join(raw.encode("utf-8", "surrogatepass"), body)
    return with_raw(header, body, raw)


def renamed(data: bytes, old: str, new: str) -> bytes:
    """The file ``data`` with tensor ``old`` renamed ``new`` (any string: escaped in the JSON)."""
    header, body = split(data)
    header = {(new if k == old else k): v for k, v in header.items()}
    return join(json.dumps(header).encode(), body)


def raw_headers(data: bytes, name: str) -> dict[str, bytes]:
    """Whole-header attacks on the file ``data`` (around tensor ``name``), by label."""
    header, body = split(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    entry = json.dumps({name: header[name]}, separators=(",", ":")).encode()[1:-1]
    key = json.dumps(name).encode()
    out = {
        "duplicate name": text[:-1] + b"," + entry + b"}",
        "duplicate field": text.replace(key + b':{"dtype":', key + b':{"dtype":"F16","dtype":', 1),
        "extra entry key": text.replace(key + b":{", key + b':{"x":1,', 1),
        "byte-order mark": b"\xef\xbb\xbf" + text,
        "invalid UTF-8": text.replace(key, key[:-1] + b'\xff"', 1),
        "overlong UTF-8": text.replace(key, key[:-1] + b'\xc0\xaf"', 1),
        "encoded surrogate": text.replace(key, key[:-1] + b'\xed\xa0\x80"', 1),
        "trailing garbage": text + b"x",
        "two objects": text + text,
        "empty header": b"",
        "only spaces": b" " * 64,
        "header is a list": b"[]",
        "header is a string": b'"x"',
        "header is null": b"null",
        "nesting 200k deep": b'{"x":' + b"[" * 200_000 + b"]" * 200_000 + b"}",
        "integer of 5000 digits": text.replace(b'"shape":[', b'"shape":[' + b"1" * 5000 + b",", 1),
        "NaN offset": text.replace(b'"data_offsets":[', b'"data_offsets":[NaN,', 1),
        "huge shape product": text.replace(b'"shape":[', b'"shape":[' + b",".join([b"4611686018427387904"] * 6) + b",", 1),
    }
    return {label: join(raw, body) for label, raw in out.items()}


def empty_objects_header(nbytes: int) -> bytes:
    """A file whose header is ``nbytes`` of distinct names mapped to empty objects (about
    ``nbytes / 12`` entries): a parser that builds them all needs gigabytes at 100 MB."""
    parts, size, i = [b"{"], 1, 0
    while size < nbytes - 16:
        part = b'"%x":{},' % i
        parts.append(part)
        size += len(part)
        i += 1
    parts.append(b'"end":{}}')
    return join(b"".join(parts), b"")


def config_fields(config: dict) -> list[tuple[str, ...]]:
    """The key path of every field of ``config`` (nested objects included)."""
    out: list[tuple[str, ...]] = [()]

    def walk(obj: dict, path: tuple[str, ...]) -> None:
        for k, v in obj.items():
            out.append(path + (k,))
            if isinstance(v, dict):
                walk(v, path + (k,))

    walk(config, ())
    return out


def config_with(config: dict, path: tuple[str, ...], raw: str) -> str:
    """config.json text with the field at ``path`` (``()``: the whole document) set to ``raw``."""
    if not path:
        return raw
    data = json.loads(json.dumps(config))
    obj = data
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = SENTINEL
    return json.dumps(data).replace(json.dumps(SENTINEL), raw)


def hostile_files(data: bytes, name: str) -> Iterator[tuple[str, bytes]]:
    """Every deterministic hostile variant of the file ``data`` (around tensor ``name``):
    whole-header attacks, every value at every field, and every hostile tensor name."""
    yield from raw_headers(data, name).items()
    header, _ = split(data)
    for field, _ in header_fields(header, name):
        for raw in JSON_VALUES + RAW_VALUES:
            yield f"{field} = {raw[:20]}", wrong_value(data, name, field, raw)
    for new in NAMES:
        yield f"name {new!r}", renamed(data, name, new)


def _random_name(header: dict, rng: random.Random) -> str:
    return rng.choice([k for k in header if k != "__metadata__"])


def random_raw_header(data: bytes, rng: random.Random) -> bytes:
    """``data`` with a whole-header attack (:func:`raw_headers`) around a random tensor."""
    header, _ = split(data)
    return rng.choice(list(raw_headers(data, _random_name(header, rng)).values()))


def random_wrong_type(data: bytes, rng: random.Random) -> bytes:
    """``data`` with a random field of a random tensor set to a random hostile JSON value."""
    header, _ = split(data)
    name = _random_name(header, rng)
    field, _ = rng.choice(header_fields(header, name))
    return wrong_value(data, name, field, rng.choice(JSON_VALUES + RAW_VALUES))


def random_renamed(data: bytes, rng: random.Random) -> bytes:
    """``data`` with a random tensor given a hostile name (:data:`NAMES`), or a hostile string
    appended to its name (the layer it belongs to stays recognisable)."""
    header, _ = split(data)
    name = _random_name(header, rng)
    hostile = rng.choice(NAMES)
    return renamed(data, name, hostile if rng.random() < 0.5 else name + hostile)


def random_config(text: str, rng: random.Random) -> str:
    """config.json ``text`` with one field (or the whole document) set to a hostile value; write
    it with :func:`write_text`."""
    config = json.loads(text)
    return config_with(config, rng.choice(config_fields(config)), rng.choice(JSON_VALUES + RAW_VALUES))


def write_text(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8, lone surrogates as the bytes ``surrogatepass`` gives (invalid
    UTF-8, as a hostile file may hold)."""
    path.write_bytes(text.encode("utf-8", "surrogatepass"))


__all__ = ["JSON_VALUES", "NAMES", "PATH_NAMES", "RAW_VALUES", "config_fields", "config_with", "empty_objects_header",
           "header_fields", "hostile_files", "random_config", "random_raw_header", "random_renamed", "random_wrong_type",
           "raw_headers", "renamed", "wrong_value", "write_text"]
