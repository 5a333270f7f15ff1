"""The environment `xenovia up` gives its children."""

from ext_proc.supervisor import GRPC_ENVIRONMENT, GatewayProcesses


def test_children_get_the_grpc_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("GRPC_EXPERIMENTS", raising=False)
    monkeypatch.setenv("RUST_BACKTRACE", "1")
    environment = GatewayProcesses(tmp_path, port=1, admin_port=2)._child_environment()
    assert environment["GRPC_EXPERIMENTS"] == GRPC_ENVIRONMENT["GRPC_EXPERIMENTS"]
    assert environment["XENOVIA_HOME"] == str(tmp_path)
    assert "RUST_BACKTRACE" not in environment


def test_operator_grpc_settings_win(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPC_EXPERIMENTS", "-event_engine_client")
    environment = GatewayProcesses(tmp_path, port=1, admin_port=2)._child_environment()
    assert environment["GRPC_EXPERIMENTS"] == "-event_engine_client"
