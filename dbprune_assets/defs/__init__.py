"""The Dagster layer: assets, resources, sensors and checks over ``core``."""

import warnings

import dagster as dg

# single-run backfills and pools are the documented way to process many
# partitions in one step; their beta notices are noise for our users
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)
