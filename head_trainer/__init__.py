"""Phase 2: fit the action expert + flow-matching head from a cache store; evaluate; export."""
