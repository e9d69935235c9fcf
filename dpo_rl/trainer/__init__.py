"""The stages (online DPO, offline DPO, reward, SFT) and ``run(cfg)``, which drives them."""
