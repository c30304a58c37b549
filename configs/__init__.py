"""The YAML configs (voc.yaml, coco.yaml); installed as the package data `pipeline.configs`, so
`--config voc` and `--config coco` name them from any folder."""
