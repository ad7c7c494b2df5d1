//! Backfill: recomputes exactly the windows that late history rows touch and replaces them in the output Delta table in one `replaceWhere` commit.
