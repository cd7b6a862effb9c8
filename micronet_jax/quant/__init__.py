"""Below 16 bits: bit widths (read by the counter and the fake quantisation alike), fake
quantisation and calibration, post-training quantisation."""
