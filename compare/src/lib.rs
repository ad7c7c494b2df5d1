//! Compare: matches two feature outputs on key and window, reports rows only on one side and differing values, and labels each difference explained by a too-late event or not.
