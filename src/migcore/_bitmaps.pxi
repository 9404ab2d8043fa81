# placeholder: filled in by the fast path work
