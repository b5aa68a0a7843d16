"""The presets' job files and data, installed as the package `alignd.presets` (pyproject.toml maps it to this
directory): `alignd run --preset NAME` reads NAME_pipeline.yaml from it, and `preset:FILE` in a configuration names
a file here (alignd.datapaths). Nothing to import."""
