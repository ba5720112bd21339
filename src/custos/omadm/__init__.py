"""OMA DM (SyncML DM 1.2): codecs, session state machine and management objects."""
