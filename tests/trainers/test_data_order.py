from reasonrl.trainers.data_order import prompts_for_step


def test_same_seed_and_step_give_the_same_prompts():
    assert prompts_for_step(50, step=3, per_step=8, seed=1) == prompts_for_step(50, step=3, per_step=8, seed=1)
    assert prompts_for_step(50, step=3, per_step=8, seed=1) != prompts_for_step(50, step=3, per_step=8, seed=2)


def test_one_epoch_visits_every_row_once_then_wraps():
    rows = [i for step in range(5) for i in prompts_for_step(20, step=step, per_step=4, seed=0)]
    assert sorted(rows) == list(range(20))
    wrapped = prompts_for_step(20, step=5, per_step=4, seed=0)  # epoch 1 starts with a new shuffle
    assert len(wrapped) == 4 and all(0 <= i < 20 for i in wrapped)


def test_steps_straddling_an_epoch_boundary():
    straddle = prompts_for_step(10, step=2, per_step=4, seed=0)  # positions 8..11: two rows of each epoch
    assert len(straddle) == 4
