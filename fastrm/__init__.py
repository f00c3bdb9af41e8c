"""fastrm: fast reward-model training for RLHF."""
