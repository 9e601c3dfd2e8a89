"""`fleetgate sim` against a running deployment: only an EST URL, a station's credentials, the
fleet root, the brokers and a subscriber identity; the operator prepared the batch."""

from __future__ import annotations

import asyncio

import pytest

from firmware_sim.deployment import LocalDeployment
from firmware_sim.devices import Enroller, credentials_path, device_ids
from firmware_sim.engine import Coordinator, Remote
from firmware_sim.fleet import BACKEND_ACL, BACKEND_GROUP
from firmware_sim.scenario import parse_scenario

SCENARIO = {
    "name": "remote",
    "drain_s": 3,
    "groups": [{"name": "sensors", "devices": 8, "rate": 2.0}],
    "stages": [{"name": "steady", "duration_s": 6, "connect_rate": 40, "churn": 0.05}],
    "misbehaviour": [
        {"kind": "acl-probe", "at_s": 1},
        {"kind": "foreign-ca", "at_s": 1},
        {"kind": "flood", "at_s": 1},
    ],
}


async def run_against_a_deployment(tmp_path):
    scenario = parse_scenario(SCENARIO)
    deployment = LocalDeployment(None, {})  # stands in for "a running deployment"
    try:
        deployment.prepare()
        target = deployment.target(tmp_path / "operator", "sim-")
        ids = device_ids(scenario, "sim-")["sensors"]
        probes = ["sim-acl-probe-0", "sim-foreign-ca-0", "sim-flood-0"]
        deployment.assign("sensors", ids + probes, None)
        deployment.assign(BACKEND_GROUP, ["sim-backend"], BACKEND_ACL)
        await deployment.start()
        await asyncio.to_thread(Enroller(target).enroll, "sim-backend")
        remote = Remote(
            est_url=target.est_url,
            brokers=target.brokers,
            root=target.root,
            station_cert=target.station_cert,
            station_key=target.station_key,
            id_prefix="sim-",
            subscriber=credentials_path(target, "sim-backend"),
        )
        return await Coordinator(scenario, remote=remote).run()
    finally:
        deployment.close()


def test_a_scenario_runs_against_a_running_deployment(tmp_path):
    result = asyncio.run(run_against_a_deployment(tmp_path))
    assert [v.line() for v in result.violations] == []
    obs = result.obs
    assert obs.enrolled == 8  # the fleet (misbehaving devices are enrolled apart)
    assert result.checked_subscribers == ("sim-backend",)
    assert obs.total("acknowledged") > 50
    answers = {who: answer for who, _, answer, _ in obs.answers}
    assert answers["sim-foreign-ca-0"] == "TLS unknown ca"
    assert answers["sim-acl-probe-0"] == "SUBACK NOT_AUTHORIZED"
    assert answers["sim-flood-0"] == "served"
    assert result.mode.startswith("against https://localhost:")


def test_what_needs_the_operator_side_is_refused_against_a_deployment(tmp_path):
    scenario = parse_scenario(
        {**SCENARIO, "faults": [{"kind": "revoke", "at_s": 1, "group": "sensors", "percent": 10}]}
    )
    remote = Remote("https://est:8443", (("mqtt", 8883),), tmp_path, tmp_path, tmp_path, "sim-")
    with pytest.raises(ValueError, match="cannot do fault revoke: run it in-process"):
        Coordinator(scenario, remote=remote)
