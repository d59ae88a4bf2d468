"""The collectives the loop calls when it runs in several processes (torchrun: DDP, FSDP2); one-process no-ops."""
