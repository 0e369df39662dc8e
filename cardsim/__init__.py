"""CPU purse card, PSAM, key handling and card images: pure state machines, plus the vpcd adapter."""
