//! Test helpers: fired windows as comparable rows, floats by their bits.

#![allow(dead_code)]

use std::collections::BTreeMap;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type, Int64Type, TimeUnit, TimestampMillisecondType};

/// A window's identity and its values, floats by their bits.
pub type Rows = BTreeMap<(String, i64), (i64, Vec<String>)>;

pub fn rows_of(batches: &[RecordBatch]) -> Rows {
    let mut rows = Rows::new();
    for batch in batches {
        let starts = batch.column(1).as_primitive::<TimestampMillisecondType>();
        let ends = batch.column(2).as_primitive::<TimestampMillisecondType>();
        for r in 0..batch.num_rows() {
            let key = cell(batch.column(0), r);
            let values = (3..batch.num_columns()).map(|c| cell(batch.column(c), r)).collect();
            let previous = rows.insert((key, starts.value(r)), (ends.value(r), values));
            assert!(
                previous.is_none(),
                "a window appears twice: {:?}",
                (cell(batch.column(0), r), starts.value(r), ends.value(r))
            );
        }
    }
    rows
}

pub fn cell(column: &arrow::array::ArrayRef, row: usize) -> String {
    if column.is_null(row) {
        return "null".into();
    }
    match column.data_type() {
        DataType::Int64 => column.as_primitive::<Int64Type>().value(row).to_string(),
        DataType::Float64 => format!("f{:016x}", column.as_primitive::<Float64Type>().value(row).to_bits()),
        DataType::Utf8 => column.as_string::<i32>().value(row).to_string(),
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            column.as_primitive::<TimestampMillisecondType>().value(row).to_string()
        }
        other => panic!("unexpected output type {other}"),
    }
}
