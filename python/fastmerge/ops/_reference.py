"""Pure-torch reference implementations (test oracle and fallback). Filled in below."""
