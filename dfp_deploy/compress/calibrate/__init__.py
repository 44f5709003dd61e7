"""Repair with a few unlabeled images: two-phase calibration and BatchNorm re-estimation."""
