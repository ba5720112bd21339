"""Run imitune (PyPI; a Windows-style OMA DM client) against a Custos server, not Intune.

Executed by the Python 3.12 interpreter of .venv-imitune (imitune needs >= 3.12), never
imported by the suite. imitune posts to a fixed Intune URL: this wrapper points its two
module-level URLs at the server under test, then runs the client's own session loop, which
authenticates with the device's PKCS#12 certificate (TLS client authentication) and answers
every command from a JSON management tree.

usage: imitune_run.py URL DEVICE_NAME PFX_FILE CA_FILE WORK_DIR
The tree the session leaves behind is WORK_DIR/DEVICE_NAME/managementTree.json.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    url, device, pfx, ca_file, work = sys.argv[1:6]
    os.chdir(work)
    # requests reads the trust store from here for every call in the session
    os.environ["REQUESTS_CA_BUNDLE"] = ca_file
    from imitune import oma_dm_client

    oma_dm_client.INTUNE_ENDPOINT = url
    oma_dm_client.INTUNE_TARGET = url
    client = oma_dm_client.OMADMClient(device, pfx, "", device)
    client.intuneInit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
