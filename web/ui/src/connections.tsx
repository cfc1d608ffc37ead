/**
 * The Connections tab (the seed's Connection tab): live records from `WatchConnections`,
 * filters, counts by status, multi-select with mouse and keyboard, and the right-click menu
 * (Copy as TSV, Clear Selected, Clear All, Show history, Export PCAP).
 */
import { useEffect, useMemo, useState } from 'preact/hooks';
import type { Connection } from './gen/interpose/common/v1/common_pb';
import { PAGE, WINDOW, conns } from './store';
import { errText, registry } from './api';
import { VirtualList } from './virtual';
import {
  bytes,
  connsTsv,
  duration,
  matchPattern,
  statusText,
  via,
  tsMillis,
} from './format';

/** What the other tabs need from this one. */
export interface Nav {
  showHistory: (ids: bigint[]) => void;
  exportSelection: (ids: bigint[]) => void;
}

/** Re-renders the component whenever the store announces a change. */
export function useStore(): number {
  const [v, setV] = useState(conns.version);
  useEffect(() => conns.subscribe(() => setV(conns.version)), []);
  return v;
}

export const CLEAR_WARNING =
  'Cleared connections are removed from the registry for good. Their packets stay in the ' +
  'proxy history, but a PCAP export then writes those connections with dummy addresses and ' +
  'ports (198.18.x.x / 198.19.x.x, server port 9), and their IDs no longer lead back to a ' +
  'record. Keep the records as long as you may need to export them.';

export function ConnectionsTab(p: { nav: Nav; focus?: { id: bigint; n: number }; active: boolean }) {
  const v = useStore();
  const [status, setStatus] = useState<'all' | 'active' | 'disconnected'>('all');
  const [portPat, setPortPat] = useState('');
  const [hostPat, setHostPat] = useState('');
  const [menu, setMenu] = useState<{ x: number; y: number } | undefined>();
  const [confirm, setConfirm] = useState<'selected' | 'all' | undefined>();
  const [note, setNote] = useState('');
  const [now, setNow] = useState(Date.now());

  // Durations of active connections grow; refresh them each second.
  useEffect(() => {
    const t = setInterval(() => setNow(Date.now()), 1000);
    return () => clearInterval(t);
  }, []);

  const rows = useMemo(() => {
    const out: Connection[] = [];
    for (const c of conns.ids().map((id) => conns.records.get(id))) {
      if (!c) continue;
      if (status === 'active' && c.status !== 1) continue;
      if (status === 'disconnected' && c.status !== 2) continue;
      if (portPat && !matchPattern(portPat, String(c.dstPort)) && !matchPattern(portPat, String(c.srcPort))) continue;
      if (hostPat && !matchPattern(hostPat, c.dstHost) && !matchPattern(hostPat, c.sni) && !matchPattern(hostPat, c.dstIp)) continue;
      out.push(c);
    }
    return out;
  }, [v, status, portPat, hostPat]);

  const indexOf = (id: bigint | undefined) => (id === undefined ? -1 : rows.findIndex((r) => r.id === id));
  const [cursor, setCursor] = useState<bigint | undefined>();
  const focusIndex = indexOf(cursor);

  // A link from another tab selects its connection and scrolls to it.
  useEffect(() => {
    if (p.focus) {
      conns.selected = new Set([p.focus.id]);
      conns.anchor = p.focus.id;
      setCursor(p.focus.id);
      conns.changedNow();
    }
  }, [p.focus]);

  const selectedRows = () => rows.filter((r) => conns.selected.has(r.id));

  function select(id: bigint, e: { shiftKey: boolean; ctrlKey: boolean; metaKey: boolean }) {
    if (e.shiftKey && conns.anchor !== undefined) {
      const a = indexOf(conns.anchor);
      const b = indexOf(id);
      if (a >= 0 && b >= 0) {
        const [lo, hi] = a < b ? [a, b] : [b, a];
        if (!(e.ctrlKey || e.metaKey)) conns.selected = new Set();
        for (let i = lo; i <= hi; i++) conns.selected.add(rows[i].id);
      }
    } else if (e.ctrlKey || e.metaKey) {
      if (conns.selected.has(id)) conns.selected.delete(id);
      else conns.selected.add(id);
      conns.anchor = id;
    } else {
      conns.selected = new Set([id]);
      conns.anchor = id;
    }
    setCursor(id);
    conns.changedNow();
  }

  async function copy() {
    setMenu(undefined);
    const sel = selectedRows();
    if (!sel.length) return;
    try {
      await navigator.clipboard.writeText(connsTsv(sel));
      setNote(`Copied ${sel.length} row${sel.length > 1 ? 's' : ''} as TSV.`);
    } catch (e) {
      setNote(`Could not copy: ${errText(e)}`);
    }
  }

  async function clear(which: 'selected' | 'all') {
    setConfirm(undefined);
    try {
      if (which === 'all') {
        const r = await registry.clearAll({});
        setNote(`Cleared ${r.cleared} records.`);
      } else {
        const ids = [...conns.selected];
        if (!ids.length) return;
        const r = await registry.clearConnections({ ids });
        setNote(`Cleared ${r.cleared} records.`);
      }
      conns.selected.clear();
      void conns.refreshCounts();
    } catch (e) {
      setNote(`Clear failed: ${errText(e)}`);
    }
  }

  function onKey(e: KeyboardEvent) {
    if (!rows.length) return;
    const i = focusIndex;
    if (e.key === 'ArrowDown' || e.key === 'ArrowUp') {
      e.preventDefault();
      const j = Math.max(0, Math.min(rows.length - 1, i < 0 ? 0 : i + (e.key === 'ArrowDown' ? 1 : -1)));
      select(rows[j].id, { shiftKey: e.shiftKey, ctrlKey: false, metaKey: false });
    } else if (e.key === 'a' && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      conns.selected = new Set(rows.map((r) => r.id));
      conns.changedNow();
    } else if (e.key === 'c' && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      void copy();
    } else if (e.key === 'Delete') {
      if (conns.selected.size) setConfirm('selected');
    } else if (e.key === 'Escape') {
      setMenu(undefined);
    }
  }

  const c = conns.counts;
  const sel = conns.selected.size;
  return (
    <div class="tab conns" hidden={!p.active}>
      <div class="toolbar">
        <label>
          Status{' '}
          <select data-testid="status-filter" value={status} onChange={(e) => setStatus((e.target as HTMLSelectElement).value as typeof status)}>
            <option value="all">all</option>
            <option value="active">active</option>
            <option value="disconnected">disconnected</option>
          </select>
        </label>
        <label>
          Port <input data-testid="port-filter" placeholder="443, 80*" value={portPat} onInput={(e) => setPortPat((e.target as HTMLInputElement).value)} />
        </label>
        <label>
          Host <input data-testid="host-filter" placeholder="*.example.com" value={hostPat} onInput={(e) => setHostPat((e.target as HTMLInputElement).value)} />
        </label>
        <span class="counts" data-testid="counts">
          total {c.total.toString()} · active {c.active.toString()} · disconnected {c.disconnected.toString()}
        </span>
        <span class="grow" />
        <button disabled={!sel} onClick={() => p.nav.showHistory([...conns.selected])}>Show history</button>
        <button disabled={!sel} onClick={() => p.nav.exportSelection([...conns.selected])}>Export PCAP</button>
      </div>
      {conns.error && <div class="error">{conns.error}</div>}
      {note && <div class="note" data-testid="conns-note">{note}</div>}
      <div class="thead conn-row">
        <span>ID</span><span>Src port</span><span>Dst port</span><span>Status</span><span>Dst host</span>
        <span>SNI</span><span>Process</span><span>Via</span><span>Bytes c→s</span><span>Bytes s→c</span><span>Duration</span><span>Node</span>
      </div>
      <div
        class="table-wrap"
        tabIndex={0}
        data-testid="conn-table"
        onKeyDown={onKey}
        onContextMenu={(e) => {
          e.preventDefault();
          setMenu({ x: e.clientX, y: e.clientY });
        }}
        onClick={() => setMenu(undefined)}
      >
        <VirtualList
          count={rows.length}
          scrollTo={focusIndex}
          row={(i) => {
            const r = rows[i];
            const end = r.closedAt ? tsMillis(r.closedAt) : now;
            const dur = r.openedAt ? duration(end - tsMillis(r.openedAt)) : '';
            return (
              <div
                key={r.id.toString()}
                class={`conn-row row ${conns.selected.has(r.id) ? 'sel' : ''} ${r.status === 2 ? 'closed' : 'live'}`}
                data-id={r.id.toString()}
                onMouseDown={(e) => {
                  if (e.button === 2 && conns.selected.has(r.id)) return;
                  select(r.id, e);
                }}
              >
                <span class="id">{r.id.toString()}</span>
                <span>{r.srcPort}</span>
                <span>{r.dstPort}</span>
                <span class="status" data-testid="status" title={r.reason}>{statusText(r)}</span>
                <span>{r.dstHost}</span>
                <span>{r.sni}</span>
                <span>{r.replayOf ? `replay of ${r.replayOf}` : r.clientProcess ? `${r.clientProcess.name} (${r.clientProcess.pid})` : ''}</span>
                <span title={r.upstream}>{via(r)}</span>
                <span>{bytes(r.bytesC2s)}</span>
                <span>{bytes(r.bytesS2c)}</span>
                <span>{dur}</span>
                <span>{r.node}</span>
              </div>
            );
          }}
        />
      </div>
      <div class="footer">
        {rows.length} shown · {sel} selected
        {conns.olderToken !== '' && (
          <>
            {` · the page holds the newest ${conns.records.size} records; older ones stay in the registry (counts and exports include them) `}
            {conns.canLoadOlder() ? (
              <button data-testid="load-older" disabled={conns.loadingOlder} onClick={() => void conns.loadOlder()}>
                {conns.loadingOlder ? 'Loading…' : `Load ${PAGE.toLocaleString()} older`}
              </button>
            ) : (
              ` (it holds at most ${WINDOW.toLocaleString()}; "interpose conns list" lists every record)`
            )}
          </>
        )}
        {!conns.ready && ' · loading…'}
      </div>
      {menu && (
        <div class="menu" role="menu" data-testid="context-menu" style={{ left: `${menu.x}px`, top: `${menu.y}px` }}>
          <button role="menuitem" disabled={!sel} onClick={copy}>Copy</button>
          <button role="menuitem" disabled={!sel} onClick={() => { setMenu(undefined); setConfirm('selected'); }}>Clear Selected</button>
          <button role="menuitem" onClick={() => { setMenu(undefined); setConfirm('all'); }}>Clear All</button>
          <hr />
          <button role="menuitem" disabled={!sel} onClick={() => { setMenu(undefined); p.nav.showHistory([...conns.selected]); }}>Show history</button>
          <button role="menuitem" disabled={!sel} onClick={() => { setMenu(undefined); p.nav.exportSelection([...conns.selected]); }}>Export PCAP</button>
        </div>
      )}
      {confirm && (
        <div class="modal-back">
          <div class="modal" role="dialog" data-testid="clear-dialog">
            <h3>{confirm === 'all' ? 'Clear all connections?' : `Clear ${sel} selected connection${sel > 1 ? 's' : ''}?`}</h3>
            <p class="warning">{CLEAR_WARNING}</p>
            <div class="buttons">
              <button onClick={() => setConfirm(undefined)}>Cancel</button>
              <button class="danger" data-testid="confirm-clear" onClick={() => clear(confirm)}>
                {confirm === 'all' ? 'Clear All' : 'Clear Selected'}
              </button>
            </div>
          </div>
        </div>
      )}
    </div>
  );
}
