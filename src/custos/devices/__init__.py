"""Enrolment, device identity (built-in CA), inventory, groups and check-in."""
