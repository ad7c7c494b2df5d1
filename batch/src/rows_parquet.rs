//! Parquet for feature rows, encoded from their shape.
//!
//! Feature rows arrive sorted by key and window, and a key's consecutive windows mostly hold the
//! same values: a value changes only when an event enters or leaves the window (in the SPEC
//! example about one row in fifteen starts a new run). A general writer hashes every value into
//! a dictionary or delta-packs every value. This one works on runs:
//! - key and value columns are dictionary-encoded with one dictionary entry per run of equal
//!   values, and their indices are run-length encoded, so a row that repeats the one before costs
//!   one comparison;
//! - `window_start` and `window_end` are delta-encoded; within a key they advance by `every`, a
//!   constant step that packs into zero bits;
//! - statistics (per column chunk, and per page in the page index) are kept for the key columns
//!   and the window bounds, which readers prune on, as the general writer was configured to do.
//!
//! The files are ordinary Parquet: version 1 data pages, Snappy, an offset index for every
//! column, the Arrow schema in the key-value metadata. A value that recurs after a different one
//! gets a second dictionary entry; the format does not ask dictionary entries to be distinct.
//! Writing by hand is the exception: arrow-rs's writer has no way to take runs, and it was 45%
//! of `lockstep batch`'s CPU time. Columns of other types (booleans) go through the general
//! writer (see [`supports`]).

use std::io::Write;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArrayType};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{DataType, Schema, SchemaRef};
use bytes::Bytes;
use parquet::arrow::{ArrowSchemaConverter, add_encoded_arrow_schema_to_metadata};
use parquet::basic::{BoundaryOrder, Compression, Encoding, Type as PhysicalType};
use parquet::column::page::{CompressedPage, Page, PageWriter};
use parquet::column::writer::ColumnCloseResult;
use parquet::data_type::ByteArray;
use parquet::errors::{ParquetError, Result};
use parquet::file::metadata::{ColumnChunkMetaData, ColumnIndexBuilder, OffsetIndexBuilder};
use parquet::file::properties::WriterProperties;
use parquet::file::statistics::Statistics;
use parquet::file::writer::{SerializedFileWriter, SerializedPageWriter, TrackedWrite};
use parquet::schema::types::{ColumnDescPtr, SchemaDescriptor};

/// Rows per row group: DataFusion's default.
pub const ROW_GROUP_ROWS: usize = 1024 * 1024;
/// Rows per data page: arrow-rs's default, small enough for the page index to prune well.
pub const PAGE_ROWS: usize = 20_000;

/// Whether [`RowsWriter`] can write `schema`: strings, 64-bit integers, timestamps and floats.
pub fn supports(schema: &Schema) -> bool {
    schema.fields().iter().all(|field| {
        matches!(
            field.data_type(),
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Int64 | DataType::Float64
        ) || matches!(field.data_type(), DataType::Timestamp(..))
    })
}

/// How one column is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// One dictionary entry per run of equal values; `statistics` for key columns.
    Runs { statistics: bool },
    /// Delta-encoded 64-bit integers, with statistics (the window bounds).
    Delta,
}

/// Writes feature rows (see the module documentation) to `W`, a row group at a time.
pub struct RowsWriter<W: Write + Send> {
    file: SerializedFileWriter<W>,
    schema: SchemaRef,
    plans: Vec<Plan>,
    columns: Vec<ColumnDescPtr>,
    pending: Vec<RecordBatch>,
    pending_rows: usize,
    row_group_rows: usize,
    page_rows: usize,
}

impl<W: Write + Send> RowsWriter<W> {
    /// A writer of rows of `schema` whose key columns are `keys`; the schema must be one
    /// [`supports`] accepts.
    pub fn try_new(out: W, schema: SchemaRef, keys: &[String]) -> Result<Self> {
        Self::with_sizes(out, schema, keys, ROW_GROUP_ROWS, PAGE_ROWS)
    }

    /// [`RowsWriter::try_new`] with given row group and page sizes (rows).
    pub fn with_sizes(
        out: W,
        schema: SchemaRef,
        keys: &[String],
        row_group_rows: usize,
        page_rows: usize,
    ) -> Result<Self> {
        if !supports(&schema) {
            return Err(ParquetError::General(format!("feature rows writer: unsupported schema {schema}")));
        }
        let descr: SchemaDescriptor = ArrowSchemaConverter::new().convert(&schema)?;
        let mut properties = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
        add_encoded_arrow_schema_to_metadata(&schema, &mut properties);
        let plans = schema
            .fields()
            .iter()
            .map(|field| {
                let bound = field.name() == "window_start" || field.name() == "window_end";
                if bound && matches!(field.data_type(), DataType::Int64 | DataType::Timestamp(..)) {
                    Plan::Delta
                } else {
                    Plan::Runs { statistics: keys.contains(field.name()) }
                }
            })
            .collect();
        let columns = descr.columns().to_vec();
        let file = SerializedFileWriter::new(out, descr.root_schema_ptr(), Arc::new(properties))?;
        Ok(RowsWriter {
            file,
            schema,
            plans,
            columns,
            pending: Vec::new(),
            pending_rows: 0,
            row_group_rows: row_group_rows.max(1),
            page_rows: page_rows.max(1),
        })
    }

    /// Buffers `batch`, writing each row group once it is full.
    pub fn write(&mut self, mut batch: RecordBatch) -> Result<()> {
        let columns = batch.columns();
        let same = columns.len() == self.schema.fields().len()
            && columns.iter().zip(self.schema.fields()).all(|(c, f)| c.data_type() == f.data_type());
        if !same {
            return Err(ParquetError::General(format!(
                "feature rows writer: batch schema {} differs from {}",
                batch.schema(),
                self.schema
            )));
        }
        while batch.num_rows() > 0 {
            let room = self.row_group_rows - self.pending_rows;
            let take = room.min(batch.num_rows());
            self.pending.push(batch.slice(0, take));
            self.pending_rows += take;
            batch = batch.slice(take, batch.num_rows() - take);
            if self.pending_rows == self.row_group_rows {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Writes the last row group and the footer, and returns the sink.
    pub fn finish(mut self) -> Result<W> {
        self.flush()?;
        self.file.into_inner()
    }

    fn flush(&mut self) -> Result<()> {
        if self.pending_rows == 0 {
            return Ok(());
        }
        let batches = std::mem::take(&mut self.pending);
        self.pending_rows = 0;
        let mut group = self.file.next_row_group()?;
        for (c, plan) in self.plans.iter().enumerate() {
            let arrays: Vec<&ArrayRef> = batches.iter().map(|b| b.column(c)).collect();
            let (bytes, close) = encode_column(&self.columns[c], *plan, &arrays, self.page_rows)?;
            group.append_column(&bytes, close)?;
        }
        group.close()?;
        Ok(())
    }
}

/// Encodes one column chunk from `arrays` (the row group's slices of the column, in order).
fn encode_column(
    column: &ColumnDescPtr,
    plan: Plan,
    arrays: &[&ArrayRef],
    page_rows: usize,
) -> Result<(Bytes, ColumnCloseResult)> {
    let nullable = column.max_def_level() > 0;
    if !nullable && arrays.iter().any(|a| a.null_count() > 0) {
        return Err(ParquetError::General(format!("column {} holds nulls but is not nullable", column.path())));
    }
    let order = match column.physical_type() {
        PhysicalType::BYTE_ARRAY => Order::Bytes,
        PhysicalType::INT64 => Order::Signed,
        _ => Order::None,
    };
    match plan {
        Plan::Delta => {
            let mut encoder = DeltaColumn::new(column.clone(), nullable, page_rows);
            for array in arrays {
                let data = array.to_data();
                let values = &data.buffer::<i64>(0)[..data.len()];
                encoder.extend(values, data.nulls())?;
            }
            encoder.finish()
        }
        Plan::Runs { statistics } => {
            let order = if statistics { order } else { Order::None };
            let mut encoder = RunColumn::new(column.clone(), nullable, page_rows, order);
            for array in arrays {
                match array.data_type() {
                    DataType::Utf8 => encoder.extend(&Strings(array.as_string::<i32>()))?,
                    DataType::LargeUtf8 => encoder.extend(&Strings(array.as_string::<i64>()))?,
                    DataType::Utf8View => encoder.extend(&Strings(array.as_string_view()))?,
                    _ => {
                        let data = array.to_data();
                        let values = &data.buffer::<u64>(0)[..data.len()];
                        encoder.extend(&Fixed { values, nulls: data.nulls() })?;
                    }
                }
            }
            encoder.finish()
        }
    }
}

/// How statistics order a column's values (Parquet's order for its physical type), or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    None,
    /// Unsigned bytewise (strings).
    Bytes,
    /// Signed 64-bit integers, plain-encoded (little-endian).
    Signed,
}

impl Order {
    fn less(self, a: &[u8], b: &[u8]) -> bool {
        match self {
            Order::None => false,
            Order::Bytes => a < b,
            Order::Signed => signed(a) < signed(b),
        }
    }
}

fn signed(plain: &[u8]) -> i64 {
    i64::from_le_bytes(plain.try_into().expect("an 8-byte value"))
}

/// A column's values as the run encoder reads them.
trait Cells {
    /// Parquet's plain encoding puts a 4-byte length before each byte array.
    const LENGTH_PREFIX: bool;
    fn len(&self) -> usize;
    fn nulls(&self) -> Option<&NullBuffer>;
    /// Whether row `i` holds `plain` (a plain-encoded value, without the length prefix).
    fn holds(&self, i: usize, plain: &[u8]) -> bool;
    /// Appends row `i`'s plain encoding, without the length prefix.
    fn push(&self, i: usize, out: &mut Vec<u8>);
    /// The first row in `from..to` that does not hold `plain`, or `to`.
    fn same_until(&self, from: usize, to: usize, plain: &[u8]) -> usize {
        (from..to).find(|&i| !self.holds(i, plain)).unwrap_or(to)
    }
}

/// 64-bit values (integers, timestamps, float bits), compared bit for bit.
struct Fixed<'a> {
    values: &'a [u64],
    nulls: Option<&'a NullBuffer>,
}

impl Cells for Fixed<'_> {
    const LENGTH_PREFIX: bool = false;
    fn len(&self) -> usize {
        self.values.len()
    }
    fn nulls(&self) -> Option<&NullBuffer> {
        self.nulls
    }
    #[inline]
    fn holds(&self, i: usize, plain: &[u8]) -> bool {
        <[u8; 8]>::try_from(plain).is_ok_and(|bytes| u64::from_le_bytes(bytes) == self.values[i])
    }
    fn push(&self, i: usize, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.values[i].to_le_bytes());
    }
    fn same_until(&self, from: usize, to: usize, plain: &[u8]) -> usize {
        let Ok(bytes) = <[u8; 8]>::try_from(plain) else { return from };
        let last = u64::from_le_bytes(bytes);
        self.values[from..to].iter().position(|&v| v != last).map_or(to, |p| from + p)
    }
}

/// Strings of any Arrow layout (`Utf8`, `LargeUtf8`, `Utf8View`).
struct Strings<A>(A);

impl<'a, A: StringArrayType<'a>> Cells for Strings<A> {
    const LENGTH_PREFIX: bool = true;
    fn len(&self) -> usize {
        self.0.len()
    }
    fn nulls(&self) -> Option<&NullBuffer> {
        self.0.nulls()
    }
    #[inline]
    fn holds(&self, i: usize, plain: &[u8]) -> bool {
        self.0.value(i).as_bytes() == plain
    }
    fn push(&self, i: usize, out: &mut Vec<u8>) {
        out.extend_from_slice(self.0.value(i).as_bytes());
    }
}

/// A page's smallest and largest value (plain-encoded) and its nulls, for the page index.
#[derive(Default)]
struct PageStatistics {
    min: Option<Vec<u8>>,
    max: Option<Vec<u8>>,
    nulls: u64,
}

impl PageStatistics {
    fn update(&mut self, order: Order, plain: &[u8]) {
        if self.min.as_deref().is_none_or(|min| order.less(plain, min)) {
            self.min = Some(plain.to_vec());
        }
        if self.max.as_deref().is_none_or(|max| order.less(max, plain)) {
            self.max = Some(plain.to_vec());
        }
    }
}

/// The pages of one column chunk: compressed, with their offset index and, when the column
/// keeps statistics, its column index and chunk statistics.
struct Pages {
    column: ColumnDescPtr,
    order: Order,
    sink: TrackedWrite<Vec<u8>>,
    snappy: snap::raw::Encoder,
    uncompressed: i64,
    rows: u64,
    offsets: OffsetIndexBuilder,
    index: ColumnIndexBuilder,
    /// Whether page minimums and maximums never decrease (the index's boundary order).
    ascending: bool,
    last_page: Option<(Vec<u8>, Vec<u8>)>,
    chunk: PageStatistics,
    encodings: Vec<Encoding>,
}

impl Pages {
    fn new(column: ColumnDescPtr, order: Order) -> Self {
        let index = ColumnIndexBuilder::new(column.physical_type());
        Pages {
            column,
            order,
            sink: TrackedWrite::new(Vec::new()),
            snappy: snap::raw::Encoder::new(),
            uncompressed: 0,
            rows: 0,
            offsets: OffsetIndexBuilder::new(),
            index,
            ascending: true,
            last_page: None,
            chunk: PageStatistics::default(),
            encodings: vec![Encoding::RLE],
        }
    }

    /// Writes a data page of `rows` rows from `raw` (levels then values, uncompressed).
    fn data_page(&mut self, raw: &[u8], rows: usize, encoding: Encoding, statistics: PageStatistics) -> Result<()> {
        let buf = Bytes::from(self.snappy.compress_vec(raw).map_err(|e| ParquetError::External(Box::new(e)))?);
        let page = Page::DataPage {
            buf,
            num_values: rows as u32,
            encoding,
            def_level_encoding: Encoding::RLE,
            rep_level_encoding: Encoding::RLE,
            statistics: None,
        };
        let page = CompressedPage::new(page, raw.len());
        let spec = SerializedPageWriter::new(&mut self.sink).write_page(page)?;
        self.uncompressed += spec.uncompressed_size as i64;
        self.offsets.append_offset_and_size(spec.offset as i64, spec.bytes_written as i32);
        self.offsets.append_row_count(rows as i64);
        self.rows += rows as u64;
        if !self.encodings.contains(&encoding) {
            self.encodings.push(encoding);
        }
        if self.order != Order::None {
            self.chunk.nulls += statistics.nulls;
            match (statistics.min, statistics.max) {
                (Some(min), Some(max)) => {
                    self.chunk.update(self.order, &min);
                    self.chunk.update(self.order, &max);
                    if let Some((last_min, last_max)) = &self.last_page {
                        self.ascending &= !self.order.less(&min, last_min) && !self.order.less(&max, last_max);
                    }
                    self.index.append(false, min.clone(), max.clone(), statistics.nulls as i64);
                    self.last_page = Some((min, max));
                }
                _ => self.index.append(true, Vec::new(), Vec::new(), statistics.nulls as i64),
            }
        }
        Ok(())
    }

    /// The chunk: `dictionary` (plain-encoded, `entries` values) first when there is one, then
    /// the data pages.
    fn finish(mut self, dictionary: Option<(Vec<u8>, u32)>) -> Result<(Bytes, ColumnCloseResult)> {
        let data = std::mem::replace(&mut self.sink, TrackedWrite::new(Vec::new())).into_inner()?;
        let mut chunk = TrackedWrite::new(Vec::with_capacity(data.len() + 1024));
        let mut dictionary_offset = None;
        if let Some((plain, entries)) = dictionary {
            let buf = Bytes::from(self.snappy.compress_vec(&plain).map_err(|e| ParquetError::External(Box::new(e)))?);
            let page = Page::DictionaryPage { buf, num_values: entries, encoding: Encoding::PLAIN, is_sorted: false };
            let page = CompressedPage::new(page, plain.len());
            let spec = SerializedPageWriter::new(&mut chunk).write_page(page)?;
            self.uncompressed += spec.uncompressed_size as i64;
            dictionary_offset = Some(0);
            if !self.encodings.contains(&Encoding::PLAIN) {
                self.encodings.push(Encoding::PLAIN);
            }
        }
        let shift = chunk.bytes_written() as i64;
        chunk.write_all(&data)?;
        let chunk = Bytes::from(chunk.into_inner()?);
        let mut offsets = self.offsets.build();
        for location in &mut offsets.page_locations {
            location.offset += shift;
        }
        let mut metadata = ColumnChunkMetaData::builder(self.column.clone())
            .set_compression(Compression::SNAPPY)
            .set_encodings(self.encodings.clone())
            .set_num_values(self.rows as i64)
            .set_total_compressed_size(chunk.len() as i64)
            .set_total_uncompressed_size(self.uncompressed)
            .set_data_page_offset(shift)
            .set_dictionary_page_offset(dictionary_offset);
        let mut column_index = None;
        if self.order != Order::None {
            let nulls = Some(self.chunk.nulls);
            let statistics = match self.order {
                Order::Bytes => Statistics::byte_array(
                    self.chunk.min.map(ByteArray::from),
                    self.chunk.max.map(ByteArray::from),
                    None,
                    nulls,
                    false,
                ),
                _ => Statistics::int64(
                    self.chunk.min.as_deref().map(signed),
                    self.chunk.max.as_deref().map(signed),
                    None,
                    nulls,
                    false,
                ),
            };
            metadata = metadata.set_statistics(statistics);
            if self.ascending {
                self.index.set_boundary_order(BoundaryOrder::ASCENDING);
            }
            column_index = Some(self.index.build()?);
        }
        let close = ColumnCloseResult {
            bytes_written: chunk.len() as u64,
            rows_written: self.rows,
            metadata: metadata.build()?,
            bloom_filter: None,
            column_index,
            offset_index: Some(offsets),
        };
        Ok((chunk, close))
    }
}

/// Definition levels of one page, as runs (only for nullable columns).
#[derive(Default)]
struct Levels {
    runs: Vec<(bool, u32)>,
}

impl Levels {
    #[inline]
    fn push(&mut self, defined: bool, count: u32) {
        match self.runs.last_mut() {
            Some((level, n)) if *level == defined => *n += count,
            _ => self.runs.push((defined, count)),
        }
    }

    /// Writes the levels as version 1 data pages hold them: a 4-byte length, then the
    /// RLE/bit-packing hybrid with a bit width of 1.
    fn write(&mut self, out: &mut Vec<u8>) {
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        for &(defined, count) in &self.runs {
            rle_run(out, defined as u64, count, 1);
        }
        let length = (out.len() - at - 4) as u32;
        out[at..at + 4].copy_from_slice(&length.to_le_bytes());
        self.runs.clear();
    }
}

/// The page being filled, as both encoders keep it: its size, its rows so far, its definition
/// levels and the buffer its bytes are assembled in.
struct PageRows {
    page_rows: usize,
    rows: usize,
    nullable: bool,
    levels: Levels,
    raw: Vec<u8>,
}

impl PageRows {
    fn new(page_rows: usize, nullable: bool) -> Self {
        PageRows { page_rows, rows: 0, nullable, levels: Levels::default(), raw: Vec::new() }
    }

    /// The next rows from `row` (of `rows`) that fit in the page.
    fn next(&self, row: usize, rows: usize) -> std::ops::Range<usize> {
        row..row + (self.page_rows - self.rows).min(rows - row)
    }

    /// Notes the definition level of `rows` rows (nullable columns only).
    fn count(&mut self, defined: bool, rows: usize) {
        if self.nullable {
            self.levels.push(defined, rows as u32);
        }
    }

    /// Counts `range` in; whether the page is full.
    fn filled(&mut self, range: std::ops::Range<usize>) -> bool {
        self.rows += range.len();
        self.rows == self.page_rows
    }

    /// The start of the page's bytes: its definition levels (nullable columns); values follow.
    fn begin(&mut self) -> Vec<u8> {
        let mut raw = std::mem::take(&mut self.raw);
        raw.clear();
        if self.nullable {
            self.levels.write(&mut raw);
        }
        raw
    }

    /// Hands back the buffer once the page is written, for the next page.
    fn end(&mut self, raw: Vec<u8>) {
        self.raw = raw;
        self.rows = 0;
    }
}

/// The dictionary-of-runs encoder of one column chunk.
struct RunColumn {
    pages: Pages,
    page: PageRows,
    /// The dictionary, plain-encoded, and its number of entries.
    dictionary: Vec<u8>,
    entries: u32,
    /// Where the last entry's value (after its length prefix) starts in `dictionary`.
    last: usize,
    /// This page's dictionary indices as runs (index, rows); a run of 0 rows is skipped.
    runs: Vec<(u32, u32)>,
    statistics: PageStatistics,
}

impl RunColumn {
    fn new(column: ColumnDescPtr, nullable: bool, page_rows: usize, order: Order) -> Self {
        RunColumn {
            pages: Pages::new(column, order),
            page: PageRows::new(page_rows, nullable),
            dictionary: Vec::new(),
            entries: 0,
            last: 0,
            runs: Vec::new(),
            statistics: PageStatistics::default(),
        }
    }

    /// The last value again, `rows` times.
    fn repeat(&mut self, rows: usize) {
        if let Some(run) = self.runs.last_mut() {
            run.1 += rows as u32;
        }
    }

    /// Row `i` of `cells` as a new dictionary entry, starting a run.
    fn entry<C: Cells>(&mut self, cells: &C, i: usize) {
        if C::LENGTH_PREFIX {
            let at = self.dictionary.len();
            self.dictionary.extend_from_slice(&[0; 4]);
            cells.push(i, &mut self.dictionary);
            let length = (self.dictionary.len() - at - 4) as u32;
            self.dictionary[at..at + 4].copy_from_slice(&length.to_le_bytes());
            self.last = at + 4;
        } else {
            self.last = self.dictionary.len();
            cells.push(i, &mut self.dictionary);
        }
        self.runs.push((self.entries, 1));
        self.entries += 1;
        if self.pages.order != Order::None {
            self.statistics.update(self.pages.order, &self.dictionary[self.last..]);
        }
    }

    /// Rows `range` of `cells`, all non-null: runs are scanned for where they end.
    fn defined<C: Cells>(&mut self, cells: &C, range: std::ops::Range<usize>) {
        let (mut i, end) = (range.start, range.end);
        while i < end {
            let same = if self.entries > 0 { cells.same_until(i, end, &self.dictionary[self.last..]) } else { i };
            if same > i {
                self.repeat(same - i);
                i = same;
            } else {
                self.entry(cells, i);
                i += 1;
            }
        }
    }

    fn extend<C: Cells>(&mut self, cells: &C) -> Result<()> {
        let mut row = 0;
        while row < cells.len() {
            if self.page.rows == 0 && self.entries > 0 {
                // A run may carry on from the last page.
                self.runs.push((self.entries - 1, 0));
            }
            let range = self.page.next(row, cells.len());
            row = range.end;
            for (rows, defined) in segments(range.clone(), cells.nulls()) {
                self.page.count(defined, rows.len());
                if defined {
                    self.defined(cells, rows);
                } else {
                    self.statistics.nulls += rows.len() as u64;
                }
            }
            if self.page.filled(range) {
                self.write_page()?;
            }
        }
        Ok(())
    }

    fn write_page(&mut self) -> Result<()> {
        let mut raw = self.page.begin();
        let encoding = if self.runs.iter().any(|&(_, n)| n > 0) {
            let largest = self.runs.last().map_or(0, |&(index, _)| index);
            let width = (32 - largest.leading_zeros()).max(1) as u8;
            raw.push(width);
            for &(index, rows) in &self.runs {
                if rows > 0 {
                    rle_run(&mut raw, index as u64, rows, width);
                }
            }
            Encoding::RLE_DICTIONARY
        } else {
            // Every row is null: no values, nothing to look up.
            Encoding::PLAIN
        };
        let statistics = std::mem::take(&mut self.statistics);
        self.pages.data_page(&raw, self.page.rows, encoding, statistics)?;
        self.page.end(raw);
        self.runs.clear();
        Ok(())
    }

    fn finish(mut self) -> Result<(Bytes, ColumnCloseResult)> {
        if self.page.rows > 0 {
            self.write_page()?;
        }
        let dictionary = (self.entries > 0).then(|| (std::mem::take(&mut self.dictionary), self.entries));
        self.pages.finish(dictionary)
    }
}

/// The delta encoder of one column chunk of 64-bit integers.
struct DeltaColumn {
    pages: Pages,
    page: PageRows,
    /// This page's non-null values.
    values: Vec<i64>,
    nulls: u64,
}

impl DeltaColumn {
    fn new(column: ColumnDescPtr, nullable: bool, page_rows: usize) -> Self {
        DeltaColumn {
            pages: Pages::new(column, Order::Signed),
            page: PageRows::new(page_rows, nullable),
            values: Vec::with_capacity(page_rows),
            nulls: 0,
        }
    }

    fn extend(&mut self, values: &[i64], nulls: Option<&NullBuffer>) -> Result<()> {
        let mut row = 0;
        while row < values.len() {
            let range = self.page.next(row, values.len());
            row = range.end;
            for (rows, defined) in segments(range.clone(), nulls) {
                self.page.count(defined, rows.len());
                if defined {
                    self.values.extend_from_slice(&values[rows]);
                } else {
                    self.nulls += rows.len() as u64;
                }
            }
            if self.page.filled(range) {
                self.write_page()?;
            }
        }
        Ok(())
    }

    fn write_page(&mut self) -> Result<()> {
        let mut raw = self.page.begin();
        let bounds = delta_binary_packed(&self.values, &mut raw);
        let statistics = PageStatistics {
            min: bounds.map(|(min, _)| min.to_le_bytes().to_vec()),
            max: bounds.map(|(_, max)| max.to_le_bytes().to_vec()),
            nulls: std::mem::take(&mut self.nulls),
        };
        self.pages.data_page(&raw, self.page.rows, Encoding::DELTA_BINARY_PACKED, statistics)?;
        self.page.end(raw);
        self.values.clear();
        Ok(())
    }

    fn finish(mut self) -> Result<(Bytes, ColumnCloseResult)> {
        if self.page.rows > 0 {
            self.write_page()?;
        }
        self.pages.finish(None)
    }
}

/// The rows of `range` as alternating runs of defined (`true`) and null rows.
fn segments(range: std::ops::Range<usize>, nulls: Option<&NullBuffer>) -> Vec<(std::ops::Range<usize>, bool)> {
    let Some(nulls) = nulls.filter(|nulls| nulls.null_count() > 0) else {
        return vec![(range, true)];
    };
    let mut segments = Vec::new();
    let mut at = range.start;
    for (from, to) in nulls.inner().slice(range.start, range.len()).set_slices() {
        let (from, to) = (range.start + from, range.start + to);
        if from > at {
            segments.push((at..from, false));
        }
        segments.push((from..to, true));
        at = to;
    }
    if at < range.end {
        segments.push((at..range.end, false));
    }
    segments
}

/// Appends an unsigned LEB128 varint.
fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

/// Appends one RLE run of the RLE/bit-packing hybrid: `count` copies of `value`, `width` bits.
fn rle_run(out: &mut Vec<u8>, value: u64, count: u32, width: u8) {
    varint(out, (count as u64) << 1);
    out.extend_from_slice(&value.to_le_bytes()[..(width as usize).div_ceil(8)]);
}

/// Parquet's DELTA_BINARY_PACKED encoding of `values`: blocks of 128 deltas in 4 miniblocks of
/// 32, each packed at the width its largest delta (less the block's smallest) needs. Returns the
/// smallest and largest value, if any.
fn delta_binary_packed(values: &[i64], out: &mut Vec<u8>) -> Option<(i64, i64)> {
    const BLOCK: usize = 128;
    const MINIBLOCKS: usize = 4;
    const MINIBLOCK: usize = BLOCK / MINIBLOCKS;
    varint(out, BLOCK as u64);
    varint(out, MINIBLOCKS as u64);
    varint(out, values.len() as u64);
    let Some(&first) = values.first() else {
        varint(out, 0);
        return None;
    };
    varint(out, zigzag(first));
    let (mut low, mut high) = (first, first);
    let mut deltas = [0i64; BLOCK];
    let mut start = 1;
    while start < values.len() {
        let n = BLOCK.min(values.len() - start);
        let (previous, current) = (&values[start - 1..start - 1 + n], &values[start..start + n]);
        start += n;
        let step = current[0].wrapping_sub(previous[0]);
        let constant = current.iter().zip(previous).fold(true, |same, (c, p)| same & (c.wrapping_sub(*p) == step));
        if constant {
            // A key's consecutive windows: one step, every width 0, nothing to pack. The values
            // are monotonic unless a step wraps, which the distance between the ends tells.
            let (a, b) = (current[0], current[n - 1]);
            if b as i128 - a as i128 == step as i128 * (n as i128 - 1) {
                low = low.min(a.min(b));
                high = high.max(a.max(b));
            } else {
                low = current.iter().fold(low, |m, &v| m.min(v));
                high = current.iter().fold(high, |m, &v| m.max(v));
            }
            varint(out, zigzag(step));
            out.extend_from_slice(&[0; MINIBLOCKS]);
            continue;
        }
        let mut min = i64::MAX;
        for ((delta, c), p) in deltas.iter_mut().zip(current).zip(previous) {
            *delta = c.wrapping_sub(*p);
            min = min.min(*delta);
            low = low.min(*c);
            high = high.max(*c);
        }
        varint(out, zigzag(min));
        let widths = out.len();
        out.extend_from_slice(&[0; MINIBLOCKS]);
        for m in 0..MINIBLOCKS {
            let from = m * MINIBLOCK;
            if from >= n {
                break;
            }
            let mut packed = [0u64; MINIBLOCK];
            let mut largest = 0u64;
            for (p, &delta) in packed.iter_mut().zip(&deltas[from..n.min(from + MINIBLOCK)]) {
                *p = delta.wrapping_sub(min) as u64;
                largest |= *p;
            }
            let width = 64 - largest.leading_zeros();
            out[widths + m] = width as u8;
            pack(&packed, width, out);
        }
    }
    Some((low, high))
}

/// Bit-packs 32 values of `width` bits, least significant bit first (`4 * width` bytes).
fn pack(values: &[u64; 32], width: u32, out: &mut Vec<u8>) {
    if width == 0 {
        return;
    }
    let mut buffer: u128 = 0;
    let mut bits = 0;
    for &value in values {
        buffer |= (value as u128) << bits;
        bits += width;
        while bits >= 8 {
            out.push(buffer as u8);
            buffer >>= 8;
            bits -= 8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int64Array, StringArray, StringViewArray, TimestampMillisecondArray};
    use arrow::datatypes::{Field, TimeUnit};
    use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
    use parquet::file::reader::{FileReader, SerializedFileReader};

    fn schema(nullable_bounds: bool) -> SchemaRef {
        let time = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
        Arc::new(Schema::new(vec![
            Field::new("user_id", DataType::Utf8, true),
            Field::new("window_start", time.clone(), nullable_bounds),
            Field::new("window_end", time, nullable_bounds),
            Field::new("tx_count", DataType::Int64, false),
            Field::new("total", DataType::Float64, true),
            Field::new("name", DataType::Utf8View, true),
        ]))
    }

    /// A small deterministic generator (no dependency on the test's order).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Rows shaped like feature rows: sorted keys, runs of windows, repeated values, with nulls,
    /// NaN, signed zeros, infinities, extreme integers and empty strings mixed in.
    fn batches(seed: u64, rows: usize, nulls: bool) -> Vec<RecordBatch> {
        let mut rng = Lcg(seed);
        let specials = [f64::NAN, -0.0, 0.0, f64::INFINITY, f64::NEG_INFINITY, 1.5, -2.25, f64::MIN_POSITIVE];
        let mut keys = Vec::new();
        let mut starts = Vec::new();
        let mut ends = Vec::new();
        let mut counts = Vec::new();
        let mut totals = Vec::new();
        let mut names = Vec::new();
        let mut key = 0u64;
        let mut start = -3_600_000i64;
        let (mut count, mut total, mut name) = (0i64, Some(0.0f64), Some(String::new()));
        for _ in 0..rows {
            if rng.below(40) == 0 {
                key += 1 + rng.below(3);
                start = rng.below(1_000_000) as i64 * 60_000 - 30_000_000_000;
            } else {
                start += 60_000 * (1 + (rng.below(10) == 0) as i64);
            }
            if rng.below(8) == 0 {
                count = match rng.below(10) {
                    0 => i64::MAX,
                    1 => i64::MIN,
                    _ => rng.below(50) as i64,
                };
                total = match rng.below(6) {
                    0 if nulls => None,
                    1 => Some(specials[rng.below(specials.len() as u64) as usize]),
                    _ => Some(rng.next() as f64 / 7.0),
                };
                name = match rng.below(5) {
                    0 if nulls => None,
                    1 => Some(String::new()),
                    2 => Some("a long name that does not fit in a string view's inline bytes".into()),
                    _ => Some(format!("m{}", rng.below(30))),
                };
            }
            let null_key = nulls && key == 0;
            keys.push((!null_key).then(|| format!("u{key:06}")));
            let bound_null = nulls && rng.below(50) == 0;
            starts.push((!bound_null).then_some(start));
            ends.push((!bound_null).then_some(start + 3_600_000));
            counts.push(count);
            totals.push(total);
            names.push(name.clone());
        }
        let schema = schema(nulls);
        let mut out = Vec::new();
        let mut at = 0;
        while at < rows {
            let n = (1 + rng.below(5000) as usize).min(rows - at);
            let slice = at..at + n;
            let columns: Vec<ArrayRef> = vec![
                Arc::new(StringArray::from(keys[slice.clone()].to_vec())),
                Arc::new(TimestampMillisecondArray::from(starts[slice.clone()].to_vec()).with_timezone("UTC")),
                Arc::new(TimestampMillisecondArray::from(ends[slice.clone()].to_vec()).with_timezone("UTC")),
                Arc::new(Int64Array::from(counts[slice.clone()].to_vec())),
                Arc::new(Float64Array::from(totals[slice.clone()].to_vec())),
                Arc::new(StringViewArray::from(names[slice].iter().map(|n| n.as_deref()).collect::<Vec<_>>())),
            ];
            out.push(RecordBatch::try_new(schema.clone(), columns).unwrap());
            at += n;
        }
        out
    }

    fn write(batches: &[RecordBatch], row_group_rows: usize, page_rows: usize) -> Bytes {
        let schema = batches[0].schema();
        let mut writer =
            RowsWriter::with_sizes(Vec::new(), schema, &["user_id".into()], row_group_rows, page_rows).unwrap();
        for batch in batches {
            writer.write(batch.clone()).unwrap();
        }
        Bytes::from(writer.finish().unwrap())
    }

    fn read(file: Bytes) -> RecordBatch {
        let options =
            ArrowReaderOptions::new().with_page_index_policy(parquet::file::metadata::PageIndexPolicy::Required);
        let reader = ParquetRecordBatchReaderBuilder::try_new_with_options(file, options).unwrap().build().unwrap();
        let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
        arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
    }

    /// Equality that tells NaN payloads and signed zeros apart, as the output must.
    fn assert_same(left: &RecordBatch, right: &RecordBatch) {
        assert_eq!(left.schema(), right.schema());
        assert_eq!(left.num_rows(), right.num_rows());
        for c in 0..left.num_columns() {
            let (l, r) = (left.column(c).to_data(), right.column(c).to_data());
            assert_eq!(l.nulls().map(|n| n.iter().collect::<Vec<_>>()), r.nulls().map(|n| n.iter().collect()));
            if let Some(l) = left.column(c).as_any().downcast_ref::<Float64Array>() {
                let r = right.column(c).as_any().downcast_ref::<Float64Array>().unwrap();
                for i in 0..l.len() {
                    if l.is_valid(i) {
                        assert_eq!(l.value(i).to_bits(), r.value(i).to_bits(), "column {c} row {i}");
                    }
                }
            } else {
                assert_eq!(left.column(c).as_ref(), right.column(c).as_ref(), "column {c}");
            }
        }
    }

    #[test]
    fn rows_read_back_bit_for_bit() {
        for (seed, rows, nulls, group, page) in [
            (1, 50_000, false, ROW_GROUP_ROWS, PAGE_ROWS),
            (2, 50_000, true, 7_000, 1_000),
            (3, 3_001, true, 1_000, 1),
            (4, 1, true, 10, 10),
            (5, 20_000, false, 20_000, 20_000),
        ] {
            let input = batches(seed, rows, nulls);
            let expected = arrow::compute::concat_batches(&input[0].schema(), &input).unwrap();
            let file = write(&input, group, page);
            assert_same(&read(file.clone()), &expected);

            let reader = SerializedFileReader::new(file).unwrap();
            let metadata = reader.metadata();
            assert_eq!(metadata.file_metadata().num_rows(), rows as i64);
            let expected_groups = rows.div_ceil(group);
            assert_eq!(metadata.num_row_groups(), expected_groups, "seed {seed}");
        }
    }

    #[test]
    fn key_and_bound_statistics_match_the_values() {
        let input = batches(7, 30_000, true);
        let file = write(&input, 8_000, 900);
        let all = arrow::compute::concat_batches(&input[0].schema(), &input).unwrap();
        let options =
            ArrowReaderOptions::new().with_page_index_policy(parquet::file::metadata::PageIndexPolicy::Required);
        let builder = ParquetRecordBatchReaderBuilder::try_new_with_options(file, options).unwrap();
        let metadata = builder.metadata().clone();
        let mut first = 0;
        for (g, group) in metadata.row_groups().iter().enumerate() {
            let rows = group.num_rows() as usize;
            let slice = all.slice(first, rows);
            // Key column: strings.
            let keys = slice.column(0).as_string::<i32>();
            let present: Vec<&str> = keys.iter().flatten().collect();
            match group.column(0).statistics().unwrap() {
                Statistics::ByteArray(s) => {
                    assert_eq!(s.min_opt().map(|v| v.as_utf8().unwrap()), present.iter().min().copied());
                    assert_eq!(s.max_opt().map(|v| v.as_utf8().unwrap()), present.iter().max().copied());
                    assert_eq!(s.null_count_opt(), Some(keys.null_count() as u64));
                }
                other => panic!("{other:?}"),
            }
            // Bounds: signed 64-bit.
            for c in [1, 2] {
                let bounds = slice.column(c).as_primitive::<arrow::datatypes::TimestampMillisecondType>();
                match group.column(c).statistics().unwrap() {
                    Statistics::Int64(s) => {
                        assert_eq!(s.min_opt().copied(), bounds.iter().flatten().min(), "group {g} column {c}");
                        assert_eq!(s.max_opt().copied(), bounds.iter().flatten().max(), "group {g} column {c}");
                        assert_eq!(s.null_count_opt(), Some(bounds.null_count() as u64));
                    }
                    other => panic!("{other:?}"),
                }
            }
            // Values keep no statistics, as before.
            assert!(group.column(3).statistics().is_none());
            first += rows;
        }
        // Every column has an offset index; the key and the bounds a column index.
        let offsets = metadata.offset_index().expect("offset index");
        let indexes = metadata.column_index().expect("column index");
        for g in 0..metadata.num_row_groups() {
            let pages = offsets[g][0].page_locations().len();
            assert_eq!(pages, (metadata.row_group(g).num_rows() as usize).div_ceil(900));
            assert!(offsets[g].iter().all(|o| o.page_locations().len() == pages));
            use parquet::file::page_index::column_index::ColumnIndexMetaData;
            assert!(matches!(indexes[g][0], ColumnIndexMetaData::BYTE_ARRAY(_)));
            assert!(matches!(indexes[g][1], ColumnIndexMetaData::INT64(_)));
            assert!(matches!(indexes[g][3], ColumnIndexMetaData::NONE));
        }
    }

    #[test]
    fn delta_encoding_reads_back_at_every_width() {
        // Widths 0 to 64, partial blocks and miniblocks, wrapping deltas, nulls.
        let mut rng = Lcg(11);
        let schema = Arc::new(Schema::new(vec![Field::new("window_start", DataType::Int64, true)]));
        for length in [1usize, 2, 31, 32, 33, 127, 128, 129, 300, 1000] {
            for shift in [0u32, 1, 7, 31, 62, 63] {
                let values: Vec<Option<i64>> = (0..length)
                    .map(|i| match rng.below(5) {
                        0 => Some(i as i64 * 60_000),
                        1 => Some((rng.next() << shift) as i64),
                        2 => Some(i64::MIN + rng.below(3) as i64),
                        3 if shift > 7 => None,
                        _ => Some(i64::MAX - rng.below(3) as i64),
                    })
                    .collect();
                let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(values))]).unwrap();
                let file = write(std::slice::from_ref(&batch), ROW_GROUP_ROWS, 250);
                assert_same(&read(file), &batch);
            }
        }
    }

    #[test]
    fn nulls_in_a_column_the_schema_says_has_none_are_an_error() {
        let declared = Arc::new(Schema::new(vec![Field::new("tx_count", DataType::Int64, false)]));
        let actual = Arc::new(Schema::new(vec![Field::new("tx_count", DataType::Int64, true)]));
        let batch = RecordBatch::try_new(actual, vec![Arc::new(Int64Array::from(vec![Some(1), None]))]).unwrap();
        let mut writer = RowsWriter::try_new(Vec::new(), declared, &[]).unwrap();
        writer.write(batch).unwrap();
        let error = writer.finish().unwrap_err().to_string();
        assert!(error.contains("column \"tx_count\" holds nulls but is not nullable"), "{error}");
    }

    #[test]
    fn bound_statistics_hold_when_a_constant_step_wraps() {
        let schema = Arc::new(Schema::new(vec![Field::new("window_start", DataType::Int64, false)]));
        let step = i64::MAX / 3;
        for first in [i64::MIN, -5, 0, i64::MAX - 7] {
            let values: Vec<i64> = (0..300).map(|i| first.wrapping_add(step.wrapping_mul(i))).collect();
            let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(values.clone()))]).unwrap();
            let file = write(std::slice::from_ref(&batch), ROW_GROUP_ROWS, 1000);
            assert_same(&read(file.clone()), &batch);
            let reader = SerializedFileReader::new(file).unwrap();
            match reader.metadata().row_group(0).column(0).statistics().unwrap() {
                Statistics::Int64(s) => {
                    assert_eq!(s.min_opt(), values.iter().min(), "first {first}");
                    assert_eq!(s.max_opt(), values.iter().max(), "first {first}");
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
