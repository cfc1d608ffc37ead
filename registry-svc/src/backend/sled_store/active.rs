//! The index of active connections: tree `active`, conn ID (8 bytes, big-endian) -> empty.
//!
//! Listing or watching the active connections, and closing a lost node's, read only the
//! records this index names, however many closed records the store holds. A record enters
//! it when opened active and leaves it when closed or cleared; a store from before the
//! index has it built from the records once, at open.

use proto::common::{ConnStatus, Connection};

use super::{Store, StoreError, decode};

/// `meta` key marking that the index is complete.
const BUILT: &[u8] = b"active_index";

/// Opens the index in `db`, building it from `conns` if the store predates it.
pub fn open(
    db: &sled::Db,
    conns: &sled::Tree,
    meta: &sled::Tree,
) -> Result<sled::Tree, StoreError> {
    let active = db.open_tree("active")?;
    if meta.get(BUILT)?.is_none() {
        for kv in conns.iter() {
            let (k, v) = kv?;
            let c: Connection = decode("connection record", &v)?;
            if c.status == ConnStatus::Active as i32 {
                active.insert(k, &[])?;
            }
        }
        meta.insert(BUILT, &[1])?;
    }
    Ok(active)
}

impl Store {
    /// Active records with IDs from `from` upwards, in ID order, each passed to `f` until
    /// it returns false.
    pub fn scan_active(
        &self,
        from: u64,
        mut f: impl FnMut(Connection) -> bool,
    ) -> Result<(), StoreError> {
        for k in self.active.range(from.to_be_bytes()..).keys() {
            let k = k?;
            let Some(id) = <[u8; 8]>::try_from(k.as_ref()).ok().map(u64::from_be_bytes) else {
                continue;
            };
            // A record closed since the key was read is skipped.
            if let Some(c) = self.get_opt(id)?
                && c.status == ConnStatus::Active as i32
                && !f(c)
            {
                break;
            }
        }
        Ok(())
    }

    /// Keeps the index in step with record `c` as just written.
    pub(super) fn index_status(&self, c: &Connection) -> Result<(), StoreError> {
        let key = c.id.to_be_bytes();
        if c.status == ConnStatus::Active as i32 {
            self.active.insert(key, &[])?;
        } else {
            self.active.remove(key)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proto::{
        common::{ConnStatus, Connection},
        registry::{ConnectionClosed, ConnectionFilter},
    };

    use crate::backend::{Records, sled_store::Store};

    fn ids(s: &Store, status: ConnStatus) -> Vec<u64> {
        let filter = ConnectionFilter {
            status: status as i32,
            ..Default::default()
        };
        let mut got = Vec::new();
        Records::scan_matching(s, &filter, 0, &mut |c| {
            got.push(c.id);
            true
        })
        .unwrap();
        got
    }

    #[test]
    fn the_index_follows_opens_closes_and_clears() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        for id in 1..=5 {
            s.open_conn(Connection {
                id,
                ..Default::default()
            })
            .unwrap();
        }
        s.close_conn(&ConnectionClosed {
            id: 2,
            ..Default::default()
        })
        .unwrap();
        s.clear(&[4]).unwrap();
        assert_eq!(ids(&s, ConnStatus::Active), vec![1, 3, 5]);
        assert_eq!(ids(&s, ConnStatus::Disconnected), vec![2]);
        assert_eq!(s.active.len(), 3);
        assert_eq!(s.clear_page(0, 2).unwrap(), vec![1, 2]);
        assert_eq!(s.active.len(), 2);
        assert_eq!(s.clear_page(3, 10).unwrap(), vec![3, 5]);
        assert!(ids(&s, ConnStatus::Active).is_empty());
        assert_eq!(s.active.len(), 0);
    }
}
