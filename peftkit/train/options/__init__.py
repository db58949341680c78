"""How training options arrive: the precedence flag > --set > recipe > default and where each value came from
(`sources`), other tools' recipe keys and value forms (`recipe_keys`), and docs/options.md (`doc`). The options
themselves are declared once, on `TrainConfig`'s fields (train/config.py), by methods and by objectives."""
