/**
 * The Connections tab's live state, kept outside the components: a bounded window of the
 * newest connection records fed by `WatchConnections`, the counts by status from
 * `ConnectionStats`, and the selection the other tabs act on.
 *
 * Memory bound: the page keeps at most `WINDOW` records (the highest IDs); the registry
 * holds the rest, and the counts and the exports cover every record, not only the window.
 * Changes are applied at once but announced to the components at most every 100 ms, so a
 * burst of thousands of events per second costs one render per tick.
 */
import type { Connection } from './gen/interpose/common/v1/common_pb';
import { WatchEvent_Kind } from './gen/interpose/registry/v1/registry_pb';
import { errText, isCanceled, registry } from './api';

/** The most records the page keeps in memory. */
export const WINDOW = 20_000;

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
   * The registry's first page of records, shown only while the watch's snapshot is still
   * streaming (a large registry takes a while to send every record), so the table is never
   * empty for long. Dropped once the snapshot is in; never merged into `records`.
   */
  preview: Connection[] = [];
  /** Called with each live UPSERT's record (the benchmark hooks in here). */
  onLive: ((c: Connection) => void) | undefined;

  private sorted: bigint[] | undefined;
  private listeners = new Set<Listener>();
  private pending: ReturnType<typeof setTimeout> | undefined;
  private abort: AbortController | undefined;
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
    }
  }

  /** Adds a record fetched on purpose (a link from the history), even if it is old. */
  adopt(c: Connection): void {
    this.records.set(c.id, c);
    this.sorted = undefined;
    this.changedNow();
  }

  /** Starts the watch and the counts; restarts them after an error. */
  start(): void {
    this.stop();
    const abort = new AbortController();
    this.abort = abort;
    void this.watch(abort.signal);
    void this.loadPreview(abort.signal);
    void this.refreshCounts();
    this.statsTimer = setInterval(() => void this.refreshCounts(), 2000);
  }

  stop(): void {
    this.abort?.abort();
    this.abort = undefined;
    if (this.statsTimer) clearInterval(this.statsTimer);
  }

  private async loadPreview(signal: AbortSignal): Promise<void> {
    try {
      const r = await registry.listConnections({ pageSize: 200 }, { signal });
      if (!this.ready && !signal.aborted) {
        this.preview = r.connections;
        this.changedNow();
      }
    } catch {
      // The watch reports connection trouble.
    }
  }

  private async watch(signal: AbortSignal): Promise<void> {
    while (!signal.aborted) {
      try {
        this.records.clear();
        this.sorted = undefined;
        this.ready = false;
        for await (const ev of registry.watchConnections({}, { signal })) {
          switch (ev.kind) {
            case WatchEvent_Kind.UPSERT:
              if (ev.connection) {
                this.put(ev.connection);
                if (this.ready) {
                  this.liveEvents++;
                  this.onLive?.(ev.connection);
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
              this.ready = true;
              this.preview = [];
              this.error = '';
              break;
            case WatchEvent_Kind.RESET:
              this.records.clear();
              this.ready = false;
              break;
          }
          this.changed();
          if (this.ready) this.countsSoon();
        }
      } catch (e) {
        if (signal.aborted || isCanceled(e)) return;
        this.error = `The live view lost the registry (${errText(e)}); retrying.`;
        this.changedNow();
      }
      // The stream ended (server restart, GOAWAY): start again with a fresh snapshot.
      await new Promise((r) => setTimeout(r, 1000));
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
