"""A reward for the schema fuzz (imported as `fuzz_rewards:alternating`): 0, 1, 0, 1, ... over the batch, so every
group's rewards differ whatever the completions (even greedy ones) and every step has advantages to train on."""


def alternating(completions, **kwargs):
    return [float(i % 2) for i in range(len(completions))]
