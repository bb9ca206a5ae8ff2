"""The stages of a recipe, one file each; every module here registers its stage in
`polyfuse.pipeline.context.STAGES` (the registry imports them all on first lookup)."""
