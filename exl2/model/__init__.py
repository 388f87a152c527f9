"""Whole-model quantization: calibration, measurement, bit allocation, planning (``exl2 fit``)."""
