"""Users, API tokens and (later) roles, LDAP and the audit log."""
