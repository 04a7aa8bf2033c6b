"""Best-checkpoint / early-stopping comparisons and TrainState round trip."""
import json

from diffold.state import TrainState, improved


def test_improved_respects_mode_and_min_delta():
    assert improved(1.0, None, "min") and improved(1.0, None, "max")
    assert improved(0.5, 1.0, "min") and not improved(1.5, 1.0, "min")
    assert improved(0.9, 0.8, "max") and not improved(0.7, 0.8, "max")
    assert not improved(0.95, 1.0, "min", min_delta=0.1)  # better, but not by more than min_delta
    assert improved(0.85, 1.0, "min", min_delta=0.1)


def test_train_state_round_trips_through_json_and_ignores_unknown_keys():
    s = TrainState(global_step=7, es_best=0.3, loss_history=[[5, 1.0]], wandb_run_id="abc")
    d = json.loads(json.dumps({**s.to_dict(), "from_a_newer_version": 1}))
    assert TrainState.from_dict(d) == s
