"""Small helpers shared by every part of the project, with no SIFT (and no torch) in them:
crash-safe file writes (`common.atomic`), the usage-error convention (`common.cli`), whether a model
or data source is at hand (`common.hub`), model resolution and loading, the embedded default
included (`common.modeling`)."""
