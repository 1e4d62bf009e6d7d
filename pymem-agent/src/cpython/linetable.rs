//! Instruction offset -> source line, in each CPython version's line-table
//! format (Objects/lnotab_notes.txt and Objects/locations.md upstream).

/// 3.8/3.9 `co_lnotab`: (bytecode delta, signed line delta) byte pairs;
/// `offset` in bytes.
pub fn line_from_lnotab(table: &[u8], first_line: i64, offset: u64) -> Option<i64> {
    let mut line = first_line;
    let mut addr: u64 = 0;
    for pair in table.chunks_exact(2) {
        addr = addr.saturating_add(u64::from(pair[0]));
        if addr > offset {
            break;
        }
        line = line.saturating_add(i64::from(pair[1] as i8));
    }
    Some(line)
}

/// 3.10 `co_linetable`: (start delta in bytes, signed line delta) pairs,
/// a line delta of -128 meaning "no line"; `offset` in bytes.
pub fn line_from_linetable_310(table: &[u8], first_line: i64, offset: u64) -> Option<i64> {
    let mut line = first_line;
    let mut end: u64 = 0;
    for pair in table.chunks_exact(2) {
        let start = end;
        end = end.saturating_add(u64::from(pair[0]));
        let delta = pair[1] as i8;
        if delta != -128 {
            line = line.saturating_add(i64::from(delta));
        }
        if start <= offset && offset < end {
            return (delta != -128).then_some(line);
        }
    }
    None
}

/// 3.11+ location table: entries of `1 code:4 length-1:3` plus varints;
/// `index` in code units.
pub fn line_from_locations(table: &[u8], first_line: i64, index: u64) -> Option<i64> {
    let mut reader = Reader { table, pos: 0 };
    let mut line = first_line;
    let mut start: u64 = 0;
    while let Some(head) = reader.byte() {
        if head & 0x80 == 0 {
            return None; // lost sync: corrupt or misread table
        }
        let code = (head >> 3) & 0x0f;
        let length = u64::from(head & 0x07) + 1;
        let this_line = match code {
            15 => None,
            14 => {
                line = line.saturating_add(reader.signed_varint()?);
                reader.varint()?; // end line delta
                reader.varint()?; // column + 1
                reader.varint()?; // end column + 1
                Some(line)
            }
            13 => {
                line = line.saturating_add(reader.signed_varint()?);
                Some(line)
            }
            10..=12 => {
                line = line.saturating_add(i64::from(code - 10));
                reader.byte()?;
                reader.byte()?;
                Some(line)
            }
            _ => {
                reader.byte()?;
                Some(line)
            }
        };
        if index < start.saturating_add(length) {
            return this_line;
        }
        start = start.saturating_add(length);
    }
    None
}

struct Reader<'a> {
    table: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.table.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn varint(&mut self) -> Option<u64> {
        let mut b = self.byte()?;
        let mut value = u64::from(b & 63);
        let mut shift = 6;
        while b & 64 != 0 {
            b = self.byte()?;
            value |= u64::from(b & 63) << shift;
            shift += 6;
            if shift > 60 {
                return None;
            }
        }
        Some(value)
    }

    fn signed_varint(&mut self) -> Option<i64> {
        let v = self.varint()?;
        Some(if v & 1 != 0 {
            -((v >> 1) as i64)
        } else {
            (v >> 1) as i64
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lnotab_pairs() {
        // line 10: bytes 0..6 -> 10, 6..10 -> 11, 10.. -> 13
        let table = [6, 1, 4, 2];
        assert_eq!(line_from_lnotab(&table, 10, 0), Some(10));
        assert_eq!(line_from_lnotab(&table, 10, 6), Some(11));
        assert_eq!(line_from_lnotab(&table, 10, 12), Some(13));
    }

    #[test]
    fn linetable_310_with_no_line_entries() {
        // 0..4 first+0, 4..8 no line, 8..12 first+3
        let table = [4, 0, 4, 0x80, 4, 3];
        assert_eq!(line_from_linetable_310(&table, 5, 2), Some(5));
        assert_eq!(line_from_linetable_310(&table, 5, 5), None);
        assert_eq!(line_from_linetable_310(&table, 5, 9), Some(8));
    }

    #[test]
    fn location_table_forms() {
        // short form (code 0, 2 units), one-line +1 (code 11, 1 unit),
        // no-column -2 (code 13, 1 unit: varint 5 = -2), none (code 15)
        let table = [
            0x80 | 1,
            0x05,
            0x80 | (11 << 3),
            1,
            2,
            0x80 | (13 << 3),
            5,
            0x80 | (15 << 3),
        ];
        assert_eq!(line_from_locations(&table, 20, 0), Some(20));
        assert_eq!(line_from_locations(&table, 20, 1), Some(20));
        assert_eq!(line_from_locations(&table, 20, 2), Some(21));
        assert_eq!(line_from_locations(&table, 20, 3), Some(19));
        assert_eq!(line_from_locations(&table, 20, 4), None);
    }
}
