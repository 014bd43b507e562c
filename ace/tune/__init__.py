"""``ace tune``: Optuna searches over a config's keys (extra ``tune``): the search, its space, and
what it leaves in its folder. Imported on demand, so that Optuna stays optional.
"""
