"""LoRA under DDP (2 gloo ranks): the adapters trained data-parallel and merged in place on every rank; rank 0's
export holds one process's merged weights within the float32 budget."""
import pytest
from _trainer_launch import two_ranks_match
from _trainer_run import run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
@pytest.mark.timeout(400)  # one torchrun launch of 2 ranks importing transformers and peft: ~30 s on a loaded CPU
def test_lora_ddp_matches_one_process(tmp_path):
    truth, eager = (run(str(tmp_path / dtype), dtype=dtype, batch_size=4, lora_r=4).state_dict()
                    for dtype in ("float64", "float32"))
    two_ranks_match(str(tmp_path / "ddp"), "ddp", 4, truth, eager)
