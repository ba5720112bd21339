"""Reports: canned queries over the fleet, CSV export, and stable SQL views for outside tools."""
