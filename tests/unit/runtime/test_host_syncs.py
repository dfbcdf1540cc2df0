"""Host syncs counted (trainer.runtime.host_syncs): what the counter sees, on the host and with a device given."""
import torch

from trainer.runtime.host_syncs import count_host_syncs


def test_the_counter_sees_each_kind_of_host_read_and_nothing_else():
    x = torch.arange(6.0)
    with count_host_syncs() as log:
        y = (x * 2).cumsum(0)
        torch.zeros(4, dtype=torch.int64).index_add_(0, y.long() % 4, torch.ones(6, dtype=torch.int64))
        torch.repeat_interleave(x, torch.ones(6, dtype=torch.int64), output_size=6)
    assert log.count == 0, log.summary()
    with count_host_syncs() as log:
        float(x.sum())
        x[x > 2]
        x.nonzero()
        torch.bincount(x.long())
        torch.repeat_interleave(x.long())
        x.tolist()
        x.cpu()
    assert [what for what, _ in log.events] == ["_local_scalar_dense.default", "index.Tensor", "nonzero.default",
                                                "bincount.default", "repeat_interleave.Tensor", "tolist", "cpu"]
    assert all(where.startswith("test_host_syncs.py") or where == "elsewhere" for _, where in log.events)


def test_with_a_device_given_reads_of_its_tensors_and_blocking_copies_to_it_count_and_host_reads_do_not():
    """On meta (as on a GPU) host and device tensors differ: ``int`` of a host tensor is no sync, a read of a
    device tensor is, and so is a copy to the device not asked to be non-blocking (``.to``, ``torch.tensor(...,
    device=)``); non-blocking copies are listed apart."""
    host, device = torch.arange(4), torch.empty(4, device="meta")
    with count_host_syncs("meta") as log:
        int(host.sum())
        host.tolist()
        host.to("meta", non_blocking=True)
        device.copy_(host, non_blocking=True)
        host.to("meta")
        device.copy_(host)
        torch.tensor([1.0, 2.0], device="meta")
        torch.full((), 3.0, device="meta")  # made on the device: no copy
        try:
            device.tolist()
        except (RuntimeError, NotImplementedError):  # meta holds no values; the read is counted first
            pass
    assert [what for what, _ in log.events] == ["blocking host-to-device copy"] * 3 + ["tolist"], log.events
    assert [what for what, _ in log.copies] == ["host-to-device copy"] * 2, log.copies
