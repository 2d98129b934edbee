"""MONAI bundles: create, run (safe and trusted modes), verify, export."""
