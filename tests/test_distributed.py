"""dpt_fast.distributed: one reading of torchrun's environment for every command."""
import pytest

from dpt_fast.distributed import Place, process_place


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
