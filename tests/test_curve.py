"""CurveZMQ: only allow-listed client keys are served; everyone else gets no reply at all."""

from __future__ import annotations

import shutil

import pytest
import zmq.auth

from lisa_agent import LisaClient
from lisa_agent.benchmarks.server import EchoBackend, synthetic_frame
from lisa_agent.errors import InvalidArgumentError, ServerUnavailableError
from lisa_agent.serving.security import create_keypair
from lisa_agent.serving.server import LisaServer

pytestmark = pytest.mark.slow  # waits out client timeouts against a CurveZMQ server

@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("curve")
    server_public, server_secret = create_keypair(root / "server", "server")
    allowed_public, allowed_secret = create_keypair(root / "clients", "robot")
    _, stranger_secret = create_keypair(root / "strangers", "stranger")
    allow = root / "allow"
    allow.mkdir()
    shutil.copy(allowed_public, allow / "robot.key")
    return {"server_public": server_public, "server_secret": server_secret, "allowed": allowed_secret,
            "stranger": stranger_secret, "allow": allow, "root": root}


@pytest.fixture(scope="module")
def curve_server(keys):
    with LisaServer(EchoBackend(), "tcp://127.0.0.1:*", curve_secret=keys["server_secret"],
                    curve_allow=keys["allow"]) as server:
        yield server


def test_allow_listed_client_is_served(curve_server, keys):
    with LisaClient(curve_server.endpoint, timeout=5, retries=0, curve_server_key=keys["server_public"],
                    curve_client_keys=keys["allowed"]) as client:
        assert client.health()["status"] == "ok"
        assert client.info()["curve"] is True
        result = client.segment(synthetic_frame(48, 64), "the cup")
        assert result.text == "Sure, [SEG]." and result.masks.shape == (1, 48, 64)


def test_keys_given_as_z85_strings_work_too(curve_server, keys):
    server_public, _ = zmq.auth.load_certificate(str(keys["server_public"]))
    public, secret = zmq.auth.load_certificate(str(keys["allowed"]))
    with LisaClient(curve_server.endpoint, timeout=5, retries=0, curve_server_key=server_public.decode(),
                    curve_client_keys=(public, secret)) as client:
        assert client.health()["status"] == "ok"


@pytest.mark.parametrize("who", ["stranger key", "no CurveZMQ", "wrong server key"])
def test_unknown_clients_get_no_reply_and_the_server_keeps_serving(curve_server, keys, who):
    curve = {
        "stranger key": {"curve_server_key": keys["server_public"], "curve_client_keys": keys["stranger"]},
        "no CurveZMQ": {},
        "wrong server key": {"curve_server_key": keys["stranger"].with_suffix(".key"),
                             "curve_client_keys": keys["allowed"]},
    }[who]
    calls_before = len(curve_server.backend.calls)
    with LisaClient(curve_server.endpoint, timeout=0.75, retries=0, **curve) as client:
        with pytest.raises(ServerUnavailableError, match="allow-listed"):
            client.health()
        with pytest.raises(ServerUnavailableError):
            client.segment(synthetic_frame(48, 64), "the cup")
    assert len(curve_server.backend.calls) == calls_before  # nothing of theirs reached the model
    with LisaClient(curve_server.endpoint, timeout=5, retries=0, curve_server_key=keys["server_public"],
                    curve_client_keys=keys["allowed"]) as friend:
        assert friend.health()["status"] == "ok"


def test_curve_allows_a_non_loopback_bind_and_checks_its_files(keys, tmp_path):
    LisaServer(EchoBackend(), "tcp://0.0.0.0:5557", curve_secret=keys["server_secret"],
               curve_allow=keys["allow"])  # constructed, never started: no socket leaves this machine
    with pytest.raises(InvalidArgumentError, match="both"):
        LisaServer(EchoBackend(), "tcp://127.0.0.1:*", curve_secret=keys["server_secret"])
    with pytest.raises(InvalidArgumentError, match="no secret key"):
        LisaServer(EchoBackend(), "tcp://127.0.0.1:*", curve_secret=keys["server_public"], curve_allow=keys["allow"])
    with pytest.raises(InvalidArgumentError, match="holds no .key files"):
        LisaServer(EchoBackend(), "tcp://127.0.0.1:*", curve_secret=keys["server_secret"], curve_allow=tmp_path)
    with pytest.raises(InvalidArgumentError, match="both"):
        LisaClient("tcp://127.0.0.1:5557", curve_server_key=keys["server_public"])


def test_serve_command_checks_curve_files_before_loading(keys, capsys):
    from lisa_agent.cli import main

    rc = main(["serve", "--model", "does-not-exist", "--bind", "tcp://0.0.0.0:5557",
               "--curve-secret", str(keys["root"] / "missing.key_secret"), "--curve-allow", str(keys["allow"])])
    assert rc == 1
    assert "missing.key_secret does not exist" in capsys.readouterr().err
