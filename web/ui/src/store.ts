/**
 * The Connections tab's live state, kept outside the components: a bounded window of the
 * newest connection records, the counts by status from `ConnectionStats`, and the selection
 * the other tabs act on.
 *
 * Opening: the registry's newest page of records (`ListConnections`, newest first) is shown
 * at once, then `WatchConnections` from the lowest ID of that page keeps exactly those
 * records and every newer one live. So the page opens as fast with a million records as
 * with ten: it never streams every record. Older records come a page at a time when the
 * user asks ("Load older"), and the watch then moves down to cover them.
 *
 * Memory bound: the page keeps at most `WINDOW` records; the registry holds the rest, and
 * the counts and the exports cover every record, not only the window. Changes are applied
 * at once but announced to the components at most every 100 ms, so a burst of thousands of
 * events per second costs one render per tick.
 */
import type { Connection } from './gen/interpose/common/v1/common_pb';
import { WatchEvent_Kind } from './gen/interpose/registry/v1/registry_pb';
import { errText, isCanceled, registry } from './api';

/** The most records the page keeps in memory. */
export const WINDOW = 20_000;
/** Records fetched per page: the first page shown at open, and each "Load older". */
export const PAGE = 2_000;

type Listener = () => void;

/** Counts by status over every record in the registry. */
export interface Counts {
  total: bigint;
  active: bigint;
  disconnected: bigint;
}

/** The live connection records and the selection. */
export class ConnStore {
  records = new Map<bigint, Connection>();
  /** Bumped on every change the components should see. */
  version = 0;
  selected = new Set<bigint>();
  /** The selection's anchor for shift-click and shift-arrows. */
  anchor: bigint | undefined;
  /** True once the watch's snapshot has arrived. */
  ready = false;
  error = '';
  counts: Counts = { total: 0n, active: 0n, disconnected: 0n };
  /** Records dropped from the window (the oldest) to keep within `WINDOW`. */
  evicted = 0;
  /** Live events applied (after the snapshot); the benchmark reads it. */
  liveEvents = 0;
  /**
   * The lowest ID the watch covers (0n: every record); undefined until the first page is
   * in. Records below it that the page holds were loaded by a link (`adopt`) and are not
   * kept live.
   */
  watchFrom: bigint | undefined;
  /** The `ListConnections` token of the next older page; empty when none is left. */
  olderToken = '';
  /** True while a "Load older" page is on its way. */
  loadingOlder = false;
  /** Called with each live UPSERT's record (the benchmark hooks in here). */
  onLive: ((c: Connection) => void) | undefined;

  private sorted: bigint[] | undefined;
  private listeners = new Set<Listener>();
  private pending: ReturnType<typeof setTimeout> | undefined;
  private abort: AbortController | undefined;
  /** Aborts the current watch only (to restart it from a lower start ID). */
  private watchAbort: AbortController | undefined;
  private statsTimer: ReturnType<typeof setInterval> | undefined;

  /** Record IDs in the window, ascending. */
  ids(): bigint[] {
    if (!this.sorted) {
      this.sorted = [...this.records.keys()].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    }
    return this.sorted;
  }

  subscribe(l: Listener): () => void {
    this.listeners.add(l);
    return () => this.listeners.delete(l);
  }

  /** Announces a change now (selection) rather than at the next tick. */
  changedNow(): void {
    this.version++;
    if (this.pending) {
      clearTimeout(this.pending);
      this.pending = undefined;
    }
    this.listeners.forEach((l) => l());
  }

  private changed(): void {
    this.sorted = undefined;
    if (this.pending) return;
    this.pending = setTimeout(() => {
      this.pending = undefined;
      this.version++;
      this.listeners.forEach((l) => l());
    }, 100);
  }

  private put(c: Connection): void {
    if (!this.records.has(c.id)) this.sorted = undefined;
    this.records.set(c.id, c);
    if (this.records.size > WINDOW + WINDOW / 10) {
      const drop = this.ids().slice(0, this.records.size - WINDOW);
      for (const id of drop) {
        this.records.delete(id);
        this.selected.delete(id);
      }
      this.evicted += drop.length;
      this.sorted = undefined;
      const lowest = this.ids()[0];
      if (lowest !== undefined && lowest > 1n) {
        // The evicted records are older ones now: "Load older" fetches them again.
        this.olderToken = (lowest - 1n).toString();
        if (this.watchFrom !== undefined && this.watchFrom < lowest) this.watchFrom = lowest;
      }
    }
  }

  /** Adds a record fetched on purpose (a link from the history), even if it is old. */
  adopt(c: Connection): void {
    this.records.set(c.id, c);
    this.sorted = undefined;
    this.changedNow();
  }

  /** Loads the newest page, starts the watch and the counts; restarts them after an error. */
  start(): void {
    this.stop();
    const abort = new AbortController();
    this.abort = abort;
    this.watchFrom = undefined;
    void this.run(abort.signal);
    void this.refreshCounts();
    this.statsTimer = setInterval(() => void this.refreshCounts(), 2000);
  }

  stop(): void {
    this.abort?.abort();
    this.abort = undefined;
    if (this.statsTimer) clearInterval(this.statsTimer);
  }

  /** True when "Load older" can fetch another page into the window. */
  canLoadOlder(): boolean {
    return this.olderToken !== '' && this.records.size + PAGE <= WINDOW;
  }

  /**
   * Fetches the next older page into the window and moves the watch down to cover it
   * (its snapshot re-sends the window, so nothing shown goes stale).
   */
  async loadOlder(): Promise<void> {
    if (!this.canLoadOlder() || this.loadingOlder) return;
    this.loadingOlder = true;
    this.changedNow();
    try {
      const r = await registry.listConnections({
        pageSize: PAGE,
        newestFirst: true,
        pageToken: this.olderToken,
      });
      for (const c of r.connections) this.put(c);
      this.olderToken = r.nextPageToken;
      const lowest = r.connections.at(-1)?.id;
      if (lowest !== undefined) {
        this.watchFrom = r.nextPageToken ? lowest : 0n;
        this.watchAbort?.abort();
      }
    } catch (e) {
      this.error = `Could not load older records (${errText(e)}).`;
    } finally {
      this.loadingOlder = false;
      this.changedNow();
    }
  }

  /** The newest page (once), then the watch from its lowest ID, again after each failure. */
  private async run(signal: AbortSignal): Promise<void> {
    while (!signal.aborted) {
      const watchAbort = new AbortController();
      this.watchAbort = watchAbort;
      const onAbort = () => watchAbort.abort();
      signal.addEventListener('abort', onAbort);
      try {
        if (this.watchFrom === undefined) await this.loadNewest(signal);
        await this.watch(watchAbort.signal, this.watchFrom ?? 0n);
      } catch (e) {
        if (signal.aborted) return;
        // A watch stopped on purpose (to move its start) is not trouble.
        if (!(watchAbort.signal.aborted && isCanceled(e))) {
          this.error = `The live view lost the registry (${errText(e)}); retrying.`;
          this.changedNow();
        }
      } finally {
        signal.removeEventListener('abort', onAbort);
      }
      if (watchAbort.signal.aborted) continue;
      // The stream ended (server restart, GOAWAY): start again.
      await new Promise((r) => setTimeout(r, 1000));
    }
  }

  /** Shows the registry's newest page at once; the watch then starts at its lowest ID. */
  private async loadNewest(signal: AbortSignal): Promise<void> {
    const r = await registry.listConnections({ pageSize: PAGE, newestFirst: true }, { signal });
    this.records.clear();
    this.sorted = undefined;
    for (const c of r.connections) this.put(c);
    this.olderToken = r.nextPageToken;
    // With every record in this page, the watch covers all (records opened later included).
    this.watchFrom = r.nextPageToken ? (r.connections.at(-1)?.id ?? 0n) : 0n;
    this.changedNow();
  }

  /**
   * Applies the watch from `start`: its snapshot updates the records held (and removes those
   * cleared meanwhile), then live changes.
   */
  private async watch(signal: AbortSignal, start: bigint): Promise<void> {
    this.ready = false;
    let seen = new Set<bigint>();
    for await (const ev of registry.watchConnections({ startId: start }, { signal })) {
      switch (ev.kind) {
        case WatchEvent_Kind.UPSERT:
          if (ev.connection) {
            this.put(ev.connection);
            if (this.ready) {
              this.liveEvents++;
              this.onLive?.(ev.connection);
            } else {
              seen.add(ev.connection.id);
            }
          }
          break;
        case WatchEvent_Kind.REMOVED:
          this.records.delete(ev.id);
          this.selected.delete(ev.id);
          this.sorted = undefined;
          if (this.ready) this.liveEvents++;
          break;
        case WatchEvent_Kind.SNAPSHOT_END:
          // Records the watch covers that its snapshot did not send were cleared meanwhile.
          for (const id of [...this.records.keys()]) {
            if (id >= start && !seen.has(id)) {
              this.records.delete(id);
              this.selected.delete(id);
            }
          }
          seen = new Set();
          this.sorted = undefined;
          this.ready = true;
          this.error = '';
          break;
        case WatchEvent_Kind.RESET:
          // A fresh snapshot follows; the records stay on screen until it ends.
          seen = new Set();
          this.ready = false;
          break;
      }
      this.changed();
      if (this.ready) this.countsSoon();
    }
  }

  private countsTimer: ReturnType<typeof setTimeout> | undefined;

  /** Refreshes the counts half a second after a live change (once per half second). */
  private countsSoon(): void {
    if (this.countsTimer) return;
    this.countsTimer = setTimeout(() => {
      this.countsTimer = undefined;
      void this.refreshCounts();
    }, 500);
  }

  /** Refreshes the counts by status over every record. */
  async refreshCounts(): Promise<void> {
    try {
      const s = await registry.connectionStats({});
      const by = (k: string) => s.byStatus.find((c) => c.key === k)?.count ?? 0n;
      const counts = { total: s.total, active: by('active'), disconnected: by('disconnected') };
      if (
        counts.total !== this.counts.total ||
        counts.active !== this.counts.active ||
        counts.disconnected !== this.counts.disconnected
      ) {
        this.counts = counts;
        this.changedNow();
      }
    } catch {
      // The watch reports connection trouble; the counts simply stay as they were.
    }
  }
}

/** The one store of the page. */
export const conns = new ConnStore();
