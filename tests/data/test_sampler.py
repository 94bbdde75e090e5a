"""The modality-length grouped sampler: one modality per optimizer step, reproducible order."""

import pytest

from vidlora.data.sampler import (
    ModalityLengthGroupedSampler,
    modality_grouped_indices,
    split_to_even_chunks,
)


def test_split_to_even_chunks_hand_example():
    # Greedy to the lightest unfilled chunk, longest first (worked by hand):
    # 0(10)->c0, 1(9)->c1, 2(8)->c1 (9<10), 3(3)->c0 (10<17), 4(2)->c0 (full), 5(1)->c1.
    lengths = [10, 9, 8, 3, 2, 1]
    assert split_to_even_chunks([0, 1, 2, 3, 4, 5], lengths, 2) == [[0, 3, 4], [1, 2, 5]]


def test_split_to_even_chunks_uneven_falls_back_to_strided():
    assert split_to_even_chunks([0, 1, 2, 3, 4], [1] * 5, 2) == [[0, 2, 4], [1, 3]]


def _lengths(num_mm: int, num_text: int) -> list[int]:
    mm = [100 + 37 * i % 900 for i in range(num_mm)]
    text = [-(5 + 13 * i % 200) for i in range(num_text)]
    return mm + text


@pytest.mark.parametrize(("per_device", "world", "accum"), [(1, 1, 8), (2, 2, 2), (1, 2, 4), (3, 1, 1)])
def test_every_step_holds_one_modality(per_device, world, accum):
    lengths = _lengths(num_mm=23, num_text=11)
    order, padding = modality_grouped_indices(lengths, per_device, world, accum, seed=0, epoch=0)
    step = per_device * world * accum
    assert len(order) % step == 0
    assert len(order) == len(lengths) + padding
    # Each group is completed to a whole number of steps, by hand: 23 -> ceil(23/step)*step etc.
    expected_padding = (-23) % step + (-11) % step
    assert padding == expected_padding
    for start in range(0, len(order), step):
        signs = {lengths[i] > 0 for i in order[start : start + step]}
        assert len(signs) == 1, f"step at {start} mixes modalities"
    assert set(order) == set(range(len(lengths)))


def test_order_is_a_function_of_seed_and_epoch():
    lengths = _lengths(17, 9)
    a = modality_grouped_indices(lengths, 1, 2, 2, seed=3, epoch=1)
    b = modality_grouped_indices(lengths, 1, 2, 2, seed=3, epoch=1)
    c = modality_grouped_indices(lengths, 1, 2, 2, seed=3, epoch=2)
    d = modality_grouped_indices(lengths, 1, 2, 2, seed=4, epoch=1)
    assert a == b
    assert a[0] != c[0]
    assert a[0] != d[0]


def test_micro_batches_inside_a_step_are_length_balanced():
    # One step = 4 micro-batches of 2; the greedy split keeps micro-batch sums close.
    lengths = [1000, 900, 800, 700, 40, 30, 20, 10]
    order, padding = modality_grouped_indices(lengths, 2, 2, 2, seed=0, epoch=0)
    assert padding == 0
    sums = [lengths[order[i]] + lengths[order[i + 1]] for i in range(0, 8, 2)]
    # Sorted descending then greedy: 1000+10, 900+20, 800+30, 700+40 (each chunk fills at 2).
    assert sorted(sums) == [740, 830, 920, 1010]


def test_single_modality_dataset_and_zero_length_rejected():
    order, padding = modality_grouped_indices([5, 6, 7, 8], 2, 1, 1, seed=0, epoch=0)
    assert sorted(order) == [0, 1, 2, 3] and padding == 0
    with pytest.raises(ValueError, match="sample 2 has length 0"):
        modality_grouped_indices([5, 6, 0], 1, 1, 1, seed=0, epoch=0)


def test_sampler_set_epoch_and_len():
    lengths = _lengths(10, 3)
    sampler = ModalityLengthGroupedSampler(
        lengths, per_device_batch_size=1, world_size=1, grad_accum=4, seed=7
    )
    assert len(sampler) == 12 + 4  # 10 -> 12, 3 -> 4
    first = list(sampler)
    assert list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and len(second) == len(first)


def test_sorting_across_steps_pins_the_padding_of_a_mixed_epoch():
    # 8 videos (150..164), 8 images (20..34), 4 text rows (-10): batch 4, one device, no accumulation.
    videos = [150, 152, 154, 156, 158, 160, 162, 164]
    images = [20, 22, 24, 26, 28, 30, 32, 34]
    lengths = [*videos, *images, -10, -10, -10, -10]
    order, padding = modality_grouped_indices(lengths, 4, 1, 1, seed=0, epoch=0)
    assert padding == 0
    batches = [[abs(lengths[i]) for i in order[s : s + 4]] for s in range(0, len(order), 4)]
    # Sorted across the whole group (two steps << WINDOW_STEPS), by hand: [164,162,160,158],
    # [156,154,152,150], [34,32,30,28], [26,24,22,20], [10,10,10,10]: 12 pad tokens in each
    # of the four media batches, over 656 + 624 + 136 + 104 + 40 = 1560 padded tokens.
    assert sorted(sorted(b, reverse=True) for b in batches) == sorted(
        [[164, 162, 160, 158], [156, 154, 152, 150], [34, 32, 30, 28], [26, 24, 22, 20], [10] * 4]
    )
    pad = sum(4 * max(b) - sum(b) for b in batches)
    assert (pad, sum(4 * max(b) for b in batches)) == (48, 1560)
    # One-step windows (the original) only sort inside a step: videos and images share batches
    # for this seed, so the epoch pads far more.
    single, _ = modality_grouped_indices(lengths, 4, 1, 1, seed=0, epoch=0, window_steps=1)
    single_batches = [[abs(lengths[i]) for i in single[s : s + 4]] for s in range(0, len(single), 4)]
    assert sum(4 * max(b) - sum(b) for b in single_batches) > 200
