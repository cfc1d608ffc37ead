/**
 * The Proxy History tab: `SearchHistory` a page at a time (connection, direction, contents
 * as text or hex), a virtualized packet list and a viewer with hex and text side by side;
 * an edited or dropped packet shows what was received and what was sent.
 *
 * Memory bound: at most `MAX_PACKETS` packets are loaded per search (the page asks for a
 * narrower search beyond that); each page is fetched only when the list is scrolled to it.
 */
import { useEffect, useRef, useState } from 'preact/hooks';
import type { Packet } from './gen/interpose/common/v1/common_pb';
import { errText, registry } from './api';
import { VirtualList } from './virtual';
import { DIRECTION_NAMES, hexDump, parseHex, showTime } from './format';

export const MAX_PACKETS = 50_000;
const PAGE = 500;

/** A search as the tab's fields hold it. */
export interface Query {
  connIds: bigint[];
  direction: number;
  contains: string;
  hex: boolean;
}

export function HistoryTab(p: {
  active: boolean;
  query: Query;
  setQuery: (q: Query) => void;
  openConn: (id: bigint) => void;
}) {
  const [connText, setConnText] = useState(p.query.connIds.join(', '));
  const [direction, setDirection] = useState(p.query.direction);
  const [contains, setContains] = useState(p.query.contains);
  const [hex, setHex] = useState(p.query.hex);
  const [utc, setUtc] = useState(false);
  const [packets, setPackets] = useState<Packet[]>([]);
  const [more, setMore] = useState<{ idx: number; token: string } | undefined>();
  const [busy, setBusy] = useState(false);
  const [err, setErr] = useState('');
  const [picked, setPicked] = useState<number>(-1);
  // Which search is current: a page of an older search that arrives late is ignored.
  const gen = useRef(0);
  // The search whose loading last finished (tests wait on it in the footer).
  const [doneGen, setDoneGen] = useState(0);

  // A new query from another tab (Show history, a link) fills in the fields.
  useEffect(() => {
    setConnText(p.query.connIds.join(', '));
    setDirection(p.query.direction);
    setContains(p.query.contains);
    setHex(p.query.hex);
  }, [p.query]);

  // Each query starts a fresh search.
  useEffect(() => {
    setPackets([]);
    setPicked(-1);
    setMore(undefined);
    setErr('');
    gen.current++;
    void load([], { idx: 0, token: '' }, gen.current);
  }, [p.query]);

  /** Loads the next page: of the current connection, or of the next one in the list. */
  async function load(have: Packet[], from: { idx: number; token: string }, g: number) {
    const q = p.query;
    let needle: Uint8Array;
    try {
      needle = q.hex ? parseHex(q.contains) : new TextEncoder().encode(q.contains);
    } catch (e) {
      setErr(`Contents: ${errText(e)}`);
      setDoneGen(g);
      return;
    }
    const ids = q.connIds.length ? q.connIds : [0n];
    if (from.idx >= ids.length) {
      setDoneGen(g);
      return;
    }
    setBusy(true);
    try {
      const r = await registry.searchHistory({
        connId: ids[from.idx],
        direction: q.direction,
        contains: needle,
        pageSize: PAGE,
        pageToken: from.token,
      });
      if (g !== gen.current) return;
      const next = have.concat(r.packets);
      setPackets(next);
      let after: { idx: number; token: string } | undefined;
      if (r.nextPageToken) after = { idx: from.idx, token: r.nextPageToken };
      else if (from.idx + 1 < ids.length) after = { idx: from.idx + 1, token: '' };
      if (next.length >= MAX_PACKETS) after = undefined;
      setMore(after);
      // A page that matched nothing of this connection: go straight on to the next one.
      if (after && r.packets.length === 0) await load(next, after, g);
    } catch (e) {
      setErr(errText(e));
    } finally {
      if (g === gen.current) {
        setBusy(false);
        setDoneGen(g);
      }
    }
  }

  function search(e?: Event) {
    e?.preventDefault();
    const ids: bigint[] = [];
    for (const part of connText.split(/[\s,]+/).filter((x) => x)) {
      if (!/^\d+$/.test(part)) {
        setErr(`"${part}" is not a connection ID (a positive whole number).`);
        return;
      }
      ids.push(BigInt(part));
    }
    if (hex) {
      try {
        parseHex(contains);
      } catch (e2) {
        setErr(`Contents: ${errText(e2)}`);
        return;
      }
    }
    p.setQuery({ connIds: ids, direction, contains, hex });
  }

  const pk = picked >= 0 ? packets[picked] : undefined;
  return (
    <div class="tab history" hidden={!p.active}>
      <form class="toolbar" onSubmit={search}>
        <label>
          Connection IDs <input data-testid="history-conn" placeholder="all" value={connText} onInput={(e) => setConnText((e.target as HTMLInputElement).value)} />
        </label>
        <label>
          Direction{' '}
          <select data-testid="history-direction" value={String(direction)} onChange={(e) => setDirection(Number((e.target as HTMLSelectElement).value))}>
            <option value="0">both</option>
            <option value="1">c2s (client → server)</option>
            <option value="2">s2c (server → client)</option>
          </select>
        </label>
        <label>
          Contains <input data-testid="history-contains" value={contains} onInput={(e) => setContains((e.target as HTMLInputElement).value)} />
        </label>
        <label>
          <input type="checkbox" checked={hex} onChange={(e) => setHex((e.target as HTMLInputElement).checked)} /> hex
        </label>
        <button type="submit" data-testid="history-search">Search</button>
        <span class="grow" />
        <label>
          <input type="checkbox" data-testid="utc" checked={utc} onChange={(e) => setUtc((e.target as HTMLInputElement).checked)} /> UTC
        </label>
      </form>
      {err && <div class="error" data-testid="history-error">{err}</div>}
      <div class="split">
        <div class="list-pane">
          <div class="thead pkt-row">
            <span>Conn</span><span>Seq</span><span>Dir</span><span>Time</span><span>Len</span><span>State</span>
          </div>
          <div class="table-wrap" data-testid="history-table">
            <VirtualList
              count={packets.length}
              onEnd={() => {
                if (more && !busy) void load(packets, more, gen.current);
              }}
              row={(i) => {
                const k = packets[i];
                return (
                  <div
                    key={`${k.connId}-${k.seq}`}
                    class={`pkt-row row ${i === picked ? 'sel' : ''} ${k.modified ? 'modified' : ''}`}
                    data-conn={k.connId.toString()}
                    data-seq={k.seq.toString()}
                    onClick={() => setPicked(i)}
                  >
                    <span>
                      <a href="#" class="conn-link" onClick={(e) => { e.preventDefault(); e.stopPropagation(); p.openConn(k.connId); }}>
                        {k.connId.toString()}
                      </a>
                    </span>
                    <span>{k.seq.toString()}</span>
                    <span>{DIRECTION_NAMES[k.direction] ?? ''}</span>
                    <span>{showTime(k.ts, utc)}</span>
                    <span>{(k.dropped ? k.original : k.data).length}</span>
                    <span>{k.dropped ? 'dropped' : k.modified ? 'edited' : ''}</span>
                  </div>
                );
              }}
            />
          </div>
          <div class="footer" data-testid="history-footer" data-done={doneGen}>
            {packets.length} packets{more ? ' (scroll for more)' : ''}{busy ? ' · loading…' : ''}
            {packets.length >= MAX_PACKETS && ` · the first ${MAX_PACKETS} only: narrow the search`}
          </div>
        </div>
        <div class="viewer" data-testid="packet-viewer">
          {pk ? <PacketView pk={pk} utc={utc} openConn={p.openConn} /> : <p class="hint">Pick a packet to see its bytes.</p>}
        </div>
      </div>
    </div>
  );
}

function Dump(p: { title: string; data: Uint8Array; testid: string }) {
  return (
    <section>
      <h4>{p.title} ({p.data.length} bytes)</h4>
      <pre class="dump" data-testid={p.testid}>{hexDump(p.data).join('\n')}</pre>
    </section>
  );
}

function PacketView(p: { pk: Packet; utc: boolean; openConn: (id: bigint) => void }) {
  const k = p.pk;
  return (
    <div>
      <p>
        Connection{' '}
        <a href="#" class="conn-link" onClick={(e) => { e.preventDefault(); p.openConn(k.connId); }}>
          {k.connId.toString()}
        </a>{' '}
        · seq {k.seq.toString()} · {DIRECTION_NAMES[k.direction]} · {showTime(k.ts, p.utc)}
      </p>
      {k.dropped ? (
        <>
          <Dump title="Received (dropped: nothing was sent)" data={k.original} testid="dump-received" />
        </>
      ) : k.modified ? (
        <>
          <Dump title="Received" data={k.original} testid="dump-received" />
          <Dump title="Sent (edited)" data={k.data} testid="dump-sent" />
        </>
      ) : (
        <Dump title="Bytes" data={k.data} testid="dump-sent" />
      )}
    </div>
  );
}
