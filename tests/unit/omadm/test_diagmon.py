"""DiagMon mapping: the run's commands, node values to health numbers, Generic Alerts."""

from __future__ import annotations

import pytest

from custos.omadm import diagmon
from custos.omadm import message as m
from custos.settings import Settings

NODES = diagmon.DEFAULT_NODES


def test_diagnose_ops_get_every_node_then_start_the_procedure(tmp_path) -> None:
    s = Settings(data_dir=tmp_path, omadm_diagmon_start="./DiagMon/Custos/Operations/Start")
    ops = diagmon.diagnose_ops(s)
    assert [o["target"] for o in ops[:-1]] == list(NODES)
    assert all(o["verb"] == "Get" and 404 in o["ok"] for o in ops[:-1])
    assert ops[-1] == {"verb": "Exec", "target": "./DiagMon/Custos/Operations/Start"}
    # without a procedure: Gets only
    assert all(o["verb"] == "Get" for o in diagmon.diagnose_ops(Settings(data_dir=tmp_path)))


@pytest.mark.parametrize(
    ("text", "unit", "expected"),
    [
        ("2048", "KB", 2048 * 1024),
        (" 512 MB", "KB", 512 * 1024**2),
        ("1.5GiB", "", 1.5 * 1024**3),
        ("87", "%", 87),
        ("87%", "", 87),
        ("90 min", "s", 5400),
        ("-1", "%", -1),
        ("lots", "KB", None),
        ("12 parsecs", "KB", None),
        ("1" * 100, "B", None),
    ],
)
def test_parse_value(text: str, unit: str, expected: float | None) -> None:
    assert diagmon.parse_value(text, unit) == expected


def test_report_from_ops_prefers_diagmon_nodes_and_skips_odd_values() -> None:
    ops = [
        {"verb": "Get", "target": "./DiagMon/Memory/RAM/Total", "status": 200, "data": "4096"},
        {"verb": "Get", "target": "./DiagMon/Memory/RAM/Avail", "status": 200, "data": "1024"},
        {"verb": "Get", "target": "./DiagMon/Memory/Storage/Total", "status": 404},
        {"verb": "Get", "target": "./DiagMon/Battery/Level", "status": 500, "error": "busy"},
        # a fallback for a field already filled is ignored; one for an empty field is used
        {"verb": "Get", "target": "./DevDetail/Ext/Microsoft/TotalRAM", "status": 200, "data": "8"},
        {
            "verb": "Get",
            "target": "./DevDetail/Ext/Microsoft/TotalStorage",
            "status": 200,
            "data": "100",
        },
        {
            "verb": "Get",
            "target": "./Vendor/MSFT/DeviceStatus/Battery/EstimatedChargeRemaining",
            "status": 200,
            "data": "-1",  # Windows: charge unknown
        },
        {"verb": "Exec", "target": "./DiagMon/X/Operations/Start", "status": 200},
        "not an op",
    ]
    rep = diagmon.report_from_ops("d" * 32, "r" * 32, ops, NODES)
    assert (rep.source, rep.kind, rep.run_id) == ("omadm", "diagmon-result", "r" * 32)
    assert rep.health == {
        "mem_total": 4096 * 1024,
        "mem_available": 1024 * 1024,
        "storage_total": 100 * 1024**2,
    }
    assert rep.data["missing"] == ["./DiagMon/Memory/Storage/Total"]
    assert rep.data["failed"] == {"./DiagMon/Battery/Level": "busy"}
    assert rep.data["procedure"] == {"target": "./DiagMon/X/Operations/Start", "status": 200}
    assert rep.data["nodes"]["./DevDetail/Ext/Microsoft/TotalRAM"] == "8"


def _alert(type_: str, data: str, *, source: str = "./DiagMon/Memory/RAM/Avail", **kw) -> m.Command:
    return m.Command(
        name="Alert",
        cmd_id="3",
        data="1226",
        items=[m.Item(source=source, meta=m.Meta(type=type_, format="chr"), data=data)],
        **kw,
    )


def test_alert_reports_keep_diagmon_alerts_only() -> None:
    p = diagmon.ALERT_TYPE_PREFIX
    cmds = [
        _alert(f"{p}:TrapNotification", "2048"),
        _alert(f"{p}:CollectedSimpleDataReport", "x" * 50_000, source="./DiagMon/Log"),
        _alert(f"{p}:OperationComplete", "1200", correlator="c" * 32),
        _alert(f"{p}:SomethingNew", "1"),
        _alert("urn:oma:at:lawmo:1.0:OperationComplete", "1200"),
        m.Command(name="Alert", cmd_id="9", data="1201"),
        m.Command(name="Replace", cmd_id="10", items=[m.Item(source="./X", data="1")]),
    ]
    reps = diagmon.alert_reports("d" * 32, cmds, NODES)
    assert [r.kind for r in reps] == [
        "diagmon-trap",
        "diagmon-data",
        "diagmon-result",
        "diagmon-alert",
    ]
    trap = reps[0]
    assert trap.data["alert"] == "TrapNotification" and trap.run_id is None
    # the trap's node is a configured one: its value is a health number
    assert trap.health == {"mem_available": 2048 * 1024}
    data = reps[1]
    assert len(data.data["data"]) == diagmon.MAX_ALERT_DATA and data.data["truncated"] is True
    assert reps[2].run_id == "c" * 32 and reps[2].data["correlator"] == "c" * 32


def test_alerts_per_message_are_bounded() -> None:
    t = f"{diagmon.ALERT_TYPE_PREFIX}:TrapNotification"
    cmds = [_alert(t, str(i)) for i in range(diagmon.MAX_ALERTS + 15)]
    assert len(diagmon.alert_reports("d" * 32, cmds, NODES)) == diagmon.MAX_ALERTS


@pytest.mark.parametrize(
    "nodes",
    [
        {"DiagMon/RAM": "mem_total"},
        {"./DiagMon/RAM": "memory"},
        {"./DiagMon/RAM": "mem_total:TB"},
        {"./DiagMon/RAM/": "mem_total"},
        {"./Diag Mon": "mem_total"},
    ],
)
def test_bad_node_settings_are_refused(tmp_path, nodes: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="omadm_diagmon_nodes"):
        Settings(data_dir=tmp_path, omadm_diagmon_nodes=nodes)


def test_node_settings_accept_a_value_without_a_field(tmp_path) -> None:
    s = Settings(data_dir=tmp_path, omadm_diagmon_nodes={"./DevDetail/SwV": ""})
    assert s.omadm_diagmon_nodes == {"./DevDetail/SwV": ""}
