"""Availability traces (`dsl_fed.availability`): the CSV parser, the diurnal generator, the config key and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dsl_fed.availability import Trace, diurnal_trace, read_trace, trace_csv, write_trace
from dsl_fed.cli import main
from dsl_fed.config import load_config
from dsl_fed.errors import DslFedError
from dsl_fed.federated.run_config import check_availability


def write(tmp_path: Path, text: str, name: str = "trace.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_good_trace_gives_the_online_rounds_per_client(tmp_path):
    path = write(tmp_path, "client,online_from,online_to\n0,1,3\n2,2,2\n\n0,6,7\n 1 , 4 , 5 \n")
    trace = read_trace(path, num_clients=3)
    assert trace.clients == [0, 1, 2]
    assert [r for r in range(1, 9) if trace.online(0, r)] == [1, 2, 3, 6, 7]
    assert [r for r in range(1, 9) if trace.online(1, r)] == [4, 5]
    assert trace.online_clients(2) == [0, 2] and trace.online_clients(8) == []
    assert not trace.online(5, 1)  # a client without a row is never online
    assert read_trace(write(tmp_path, "\ufeff" + path.read_text(), "bom.csv")) == trace  # Excel's BOM is fine


@pytest.mark.parametrize("text, where, message", [
    ("", 1, "expected the header client,online_from,online_to, found 'nothing'"),
    ("client,from,to\n0,1,2\n", 1, "expected the header client,online_from,online_to, found 'client,from,to'"),
    ("client,online_from,online_to\n", None, "no rows after the header: no client would ever be online"),
    ("client,online_from,online_to\n0,1,2\n1,1\n", 3, "expected 3 values (client,online_from,online_to), found 2"),
    ("client,online_from,online_to\n0,1,2,4\n", 2, "expected 3 values (client,online_from,online_to), found 4"),
    ("client,online_from,online_to\nx,1,2\n", 2, "client must be a whole number >= 0, got 'x'"),
    ("client,online_from,online_to\n-1,1,2\n", 2, "client must be a whole number >= 0, got '-1'"),
    ("client,online_from,online_to\n0,1.5,2\n", 2, "online_from must be a whole number >= 0, got '1.5'"),
    ("client,online_from,online_to\n0,1,\n", 2, "online_to must be a whole number >= 0, got ''"),
    ("client,online_from,online_to\n0,0,2\n", 2, "online_from 0 must be a round in 1..100000 (rounds count from 1)"),
    ("client,online_from,online_to\n0,1,2\n0,5,4\n", 3, "online_to 4 must be in online_from..100000 (online_from is "
                                                        "5; both rounds are inclusive)"),
    ("client,online_from,online_to\n0,1,2\n7,1,2\n", 3, "client 7 is not in the federation (client ids 0-2; 1 such "
                                                        "client(s) in the file)"),
    ("client,online_from,online_to\n1000000000,1,2\n", 2, "client 1000000000 is not a client id (ids are below "
                                                          "1000000000)"),
])
def test_each_bad_input_is_one_line_naming_file_and_row(tmp_path, text, where, message):
    path = write(tmp_path, text)
    with pytest.raises(DslFedError) as info:
        read_trace(path, num_clients=3)
    prefix = f"{path}:{where}: " if where else f"{path}: "
    assert str(info.value) == prefix + message


def test_client_ids_share_the_range_of_deployed_node_ids():
    from dsl_fed.availability import MAX_CLIENT
    from dsl_fed.data.nodes import NODE_ID_RANGE

    assert MAX_CLIENT == NODE_ID_RANGE


def test_unreadable_traces_are_one_line(tmp_path):
    with pytest.raises(DslFedError, match=r"missing.csv: availability trace not found \(federated.availability\)$"):
        read_trace(tmp_path / "missing.csv")
    (tmp_path / "latin1.csv").write_bytes(b"client,online_from,online_to\n0,1,2 \xe9\n")
    with pytest.raises(DslFedError, match=r"latin1.csv: not UTF-8 text \(byte 35\)"):
        read_trace(tmp_path / "latin1.csv")


def test_diurnal_trace_is_deterministic_with_the_requested_share_and_everyone_online_each_day():
    trace = diurnal_trace(200, 48, rounds_per_day=24, online_share=0.3, seed=3)
    assert trace == diurnal_trace(200, 48, rounds_per_day=24, online_share=0.3, seed=3)
    assert trace != diurnal_trace(200, 48, rounds_per_day=24, online_share=0.3, seed=4)
    assert trace.share(200, 48) == pytest.approx(7 / 24)  # 0.3 of a 24-round day is 7 whole rounds
    for day in (range(1, 25), range(25, 49)):  # every client is online in every day, for one contiguous stretch
        for client in range(200):
            online = [r for r in day if trace.online(client, r)]
            assert len(online) == 7 and (online[-1] - online[0] == 6 or online[0] == day[0]), client
    phases = {min(r for r in range(1, 25) if trace.online(c, r) and not trace.online(c, r - 1 if r > 1 else 24))
              for c in range(200)}
    assert len(phases) > 15  # random time zones, not one shared window
    per_round = [len(trace.online_clients(r)) for r in range(1, 49)]
    assert min(per_round) > 0.15 * 200 and max(per_round) < 0.45 * 200  # spread over the day, not all at once


def test_a_written_trace_reads_back_and_an_existing_file_is_never_replaced(tmp_path):
    trace = diurnal_trace(5, 30, rounds_per_day=10, online_share=0.5, seed=1)
    path = write_trace(trace, tmp_path / "sub" / "t.csv")
    again = read_trace(path, num_clients=5)
    assert again.intervals == trace.intervals and trace_csv(again) == path.read_text()
    with pytest.raises(DslFedError, match="exists and is not an earlier availability trace"):
        write_trace(trace, path)
    mine = write(tmp_path, "my notes\n", "notes.csv")
    with pytest.raises(DslFedError):
        write_trace(trace, mine)
    assert mine.read_text() == "my notes\n"


def test_make_availability_cli(tmp_path, capsys):
    out = tmp_path / "trace.csv"
    argv = ["make-availability", str(out), "--clients", "6", "--rounds", "20", "--rounds-per-day", "10",
            "--online", "0.4", "--seed", "2"]
    assert main(argv) == 0
    assert read_trace(out, num_clients=6).intervals == diurnal_trace(6, 20, 10, 0.4, 2).intervals
    assert "6 clients over 20 rounds, each online 4 of every 10 rounds (40.0% of client-rounds)" in capsys.readouterr().out
    assert main(argv) == 2  # never over an existing file
    assert "exists" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):  # argparse's own exit, as for every option out of range
        main(["make-availability", str(tmp_path / "x.csv"), "--clients", "6", "--rounds", "20", "--online", "1.5"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --online: must be in (0, 1], got 1.5" in err


def test_config_key_resolves_against_the_yaml_and_is_checked_before_anything_runs(tmp_path):
    (tmp_path / "conf").mkdir()
    write(tmp_path / "conf", "client,online_from,online_to\n0,1,2\n1,3,4\n5,1,1\n")
    config = tmp_path / "conf" / "fed.yaml"
    config.write_text(yaml.safe_dump({"data": {"manifest": "m.csv"}, "federated": {"availability": "trace.csv"}}))
    cfg = load_config(config)
    assert cfg.federated.availability == str(tmp_path / "conf" / "trace.csv")
    with pytest.raises(DslFedError, match=r"trace.csv:4: client 5 is not in the federation \(client ids 0-2;"):
        check_availability(cfg, num_clients=3)
    assert check_availability(cfg, None) == []  # a deployment: ids are random, only the file is checked
    warnings = check_availability(cfg, num_clients=8)
    assert warnings[0].endswith("5 of 8 clients have no row in " + cfg.federated.availability + " and are never online")
    assert check_availability(load_config(config, ["federated.availability="]), 3) == []
    assert Trace().online(0, 1) is False



def test_a_client_online_only_after_the_last_round_is_warned_about(tmp_path):
    trace = write(tmp_path, "client,online_from,online_to\n0,1,2\n1,9,12\n2,2,3\n")
    config = tmp_path / "fed.yaml"
    config.write_text(yaml.safe_dump({"data": {"manifest": "m.csv"},
                                      "federated": {"availability": "trace.csv", "phase1_rounds": 4, "phase2_rounds": 4}}))
    assert check_availability(load_config(config), 3) == [
        f"federated.availability: 1 client(s) of {trace} are online in none of the run's 8 rounds (e.g. client 1)"]
    assert check_availability(load_config(config, ["federated.phase2_rounds=5"]), 3) == []


def test_simulate_refuses_a_bad_trace_in_one_line_before_flower_starts(demo_manifest, tmp_path, capsys):
    from flower_helpers import write_config

    write(tmp_path, "client,online_from,online_to\n0,1,2\n3,1,2\n")  # the demo corpus gives 3 shards: ids 0-2
    config = write_config(tmp_path, demo_manifest, federated={"availability": "trace.csv"})
    assert main(["simulate", str(config)]) == 2
    err = capsys.readouterr().err
    assert err == (f"dsl_fed simulate: error: {tmp_path / 'trace.csv'}:3: client 3 is not in the federation (client ids 0-2; 1 "
                   "such client(s) in the file)\n")
    assert not (tmp_path / "runs").exists()
