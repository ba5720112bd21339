"""Device diagnostics: health snapshots from agents and OMA DM DiagMon reports."""
