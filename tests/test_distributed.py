"""dpt_fast.distributed: one reading of torchrun's environment for every command."""
import pytest

from dpt_fast.distributed import Place, pick_device, process_place, rendezvous_set


def test_one_process_without_torchrun():
    assert process_place({}) == Place(0, 1, 0) and process_place({}).main


def test_torchrun_variables():
    place = process_place({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert place == Place(5, 8, 1) and not place.main


def test_local_rank_falls_back_to_rank():
    assert process_place({"RANK": "2", "WORLD_SIZE": "4"}).local_rank == 2


@pytest.mark.parametrize("environ", [{"RANK": "4", "WORLD_SIZE": "4"}, {"WORLD_SIZE": "0"},
                                     {"RANK": "x", "WORLD_SIZE": "2"}, {"LOCAL_RANK": "-1"}])
def test_inconsistent_or_garbage_variables_are_named(environ):
    with pytest.raises(ValueError, match="RANK|WORLD_SIZE"):
        process_place(environ)


def test_predict_reads_the_place_with_a_usage_error_for_garbage(monkeypatch):
    from dpt_fast import predict
    from dpt_fast.inference import UsageError
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert predict.distributed_env() == (1, 2, 1)
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(UsageError, match="RANK"):
        predict.distributed_env()


def test_train_reads_the_same_place(monkeypatch):
    """train's process set-up uses the shared reader (LOCAL_RANK falls back to RANK there too)."""
    from dpt_fast import train
    assert train.process_place is process_place


def test_local_world_size_falls_back_to_the_world_size():
    assert process_place({"RANK": "1", "WORLD_SIZE": "4"}).local_world == 4
    assert process_place({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}).local_world == 2
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE"):
        process_place({"LOCAL_WORLD_SIZE": "two"})


def test_rendezvous_is_torchruns_master_address():
    assert rendezvous_set({"MASTER_ADDR": "127.0.0.1"}) and not rendezvous_set({}) and not rendezvous_set(
        {"MASTER_ADDR": ""})


@pytest.fixture
def two_gpus(monkeypatch):
    """CUDA as a machine with two visible GPUs (cuda:1 current) shows it to dpt_fast.distributed."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    return torch


@pytest.mark.parametrize("requested", [None, "", "auto", "cuda"])
def test_under_torchrun_a_process_takes_gpu_local_rank_modulo_the_visible_ones(two_gpus, requested):
    torch = two_gpus
    assert pick_device(requested, Place(rank=4, world=8, local_rank=0)) == torch.device("cuda", 0)
    assert pick_device(requested, Place(rank=5, world=8, local_rank=1)) == torch.device("cuda", 1)
    # a launcher that shows each process only its own GPUs: LOCAL_RANK 3 is not an invalid ordinal
    assert pick_device(requested, Place(rank=3, world=4, local_rank=3)) == torch.device("cuda", 1)


def test_one_process_takes_the_current_cuda_device(two_gpus):
    torch = two_gpus
    assert pick_device("auto", Place()) == torch.device("cuda", 1)
    assert pick_device("cuda", Place(local_rank=0)) == torch.device("cuda", 1)


def test_an_explicit_device_is_kept(two_gpus):
    torch = two_gpus
    assert pick_device("cuda:0", Place(rank=1, world=2, local_rank=1)) == torch.device("cuda", 0)
    assert pick_device("cpu", Place(rank=1, world=2, local_rank=1)) == torch.device("cpu")


def test_devices_that_cannot_be_used_raise_the_given_error(two_gpus, monkeypatch):
    class Refused(Exception):
        pass

    with pytest.raises(Refused, match="2 CUDA device"):
        pick_device("cuda:2", Place(), error=Refused)
    with pytest.raises(Refused, match="not a device"):
        pick_device("gpu", Place(), error=Refused)
    monkeypatch.setattr(two_gpus.cuda, "is_available", lambda: False)
    assert pick_device("auto", Place()) == two_gpus.device("cpu")
    with pytest.raises(Refused, match="CUDA is not available"):
        pick_device("cuda", Place(), error=Refused)


def test_train_and_predict_choose_the_device_by_the_same_rule(two_gpus, monkeypatch):
    """A single process asked for "cuda": both commands take the current device (predict took
    cuda:LOCAL_RANK % count, train the current device)."""
    torch = two_gpus
    from dpt_fast import predict, train
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert train._Dist("cuda").device == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]
    assert predict.pick_device("cuda", predict._place()) == torch.device("cuda", 1)


def test_predict_reports_an_unusable_device_as_a_usage_error(monkeypatch):
    import torch

    from dpt_fast import predict
    from dpt_fast.inference import UsageError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="^--device cuda: CUDA is not available"):
        predict.pick_device("cuda", Place())
    with pytest.raises(UsageError, match="^--device 'gpu' is not a device"):
        predict.pick_device("gpu", Place())


def test_train_reports_a_garbage_rank_as_a_usage_error(monkeypatch, tmp_path, capsys):
    from dpt_fast import train
    monkeypatch.setenv("RANK", "zero")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert train.main(["--data", "synthetic", "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    assert "RANK='zero' is not an integer" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
