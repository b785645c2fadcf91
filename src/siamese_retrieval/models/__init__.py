"""Encoders, the SiameseModule and the pair losses."""
