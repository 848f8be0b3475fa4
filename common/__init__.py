"""Small helpers shared by every part of the project, with no SIFT (and no torch) in them:
crash-safe file writes (`common.atomic`) and model resolution, the embedded default included
(`common.modeling`)."""
