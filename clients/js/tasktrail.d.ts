// Types for tasktrail.mjs.

export type Status = 'pending' | 'running' | 'completed' | 'failed' | 'canceled';

export type EventType =
    | 'TaskCreated' | 'TaskStarted' | 'ProgressReported' | 'TaskCompleted' | 'TaskFailed'
    | 'TaskCanceled' | 'TaskRequeued' | 'TaskRetried' | 'TaskUpdated' | 'TaskDeleted';

export type Json = null | boolean | number | string | Json[] | {[key: string]: Json};

export interface Task {
    id: number;
    task_id: string;
    task_type: string;
    status: Status;
    progress: number;
    params: Record<string, Json> | null;
    result: Record<string, Json> | null;
    error: string | null;
    retry_count: number;
    created_at: string;
    updated_at: string;
    started_at: string | null;
    completed_at: string | null;
    version: number;
}

/** RFC 9457 problem details: what the seed's calls resolve to on a refusal. */
export interface Problem {
    type: string;
    title: string;
    status: number;
    detail: string;
    errors?: {field: string; message: string}[];
    current_status?: Status;
    allowed?: Status[];
}

export interface HistoryEvent {
    version: number;
    position: number;
    type: EventType;
    occurred_at: string;
    data: Record<string, Json>;
    metadata: Record<string, Json>;
}

/** An event of the global feed or a stream: as in the history, plus its task and cursor. */
export interface FeedEvent extends HistoryEvent {
    task_id: string;
    cursor: string;
}

export interface History {
    task_id: string;
    events: HistoryEvent[];
}

export interface FeedPage {
    events: FeedEvent[];
    next_cursor: string;
}

export interface Stats {
    total: number;
    pending: number;
    running: number;
    completed: number;
    failed: number;
    canceled: number;
}

export interface TaskChanges {
    status?: Status;
    progress?: number;
    result?: Record<string, Json>;
    error?: string;
}

export interface ListFilters {
    status?: Status | '';
    task_type?: string;
    skip?: number | string;
    limit?: number | string;
    cursor?: string;
}

export interface NewTask {
    task_type: string;
    params?: Record<string, Json> | null;
}

export interface BatchUpdate extends TaskChanges {
    task_id: string;
    if_version?: number;
    delete?: boolean;
}

export interface BatchResult {
    task_id: string;
    /** The item's HTTP status: 200, or 404, 409, 412, 422. */
    status: number;
    task?: Task;
    deleted?: boolean;
    problem?: Problem;
}

export interface Watch {
    /** The last state: finished, or null if the task was deleted; undefined if closed early. */
    done: Promise<Task | null | undefined>;
    close(): void;
}

export interface EventSourceLike {
    readonly readyState: number;
    addEventListener(type: string, listener: (message: {data: string}) => void): void;
    close(): void;
}

export interface TaskManagerOptions {
    /** A bearer token (an API key with the scope the calls need). */
    apiKey?: string;
    /** Tries per create (and per read) on a 503 or a network error; default 10 (6 to 11 s in all). */
    attempts?: number;
    /** Milliseconds an answer may take before the request is given up as a network failure; default 30000. */
    timeout?: number;
    /** 'stream' (Server-Sent Events over fetch, the default) or 'poll'. */
    watch?: 'stream' | 'poll';
    /** Milliseconds between polls when watch is 'poll'; default 1000. */
    pollInterval?: number;
    /** Stream with this EventSource instead (it cannot send an API key). */
    EventSource?: new (url: string) => EventSourceLike;
}

export declare class TaskTrailError extends Error {
    constructor(status: number, problem?: Partial<Problem>);
    /** The HTTP status; 0 when the server could not be reached. */
    status: number;
    problem: Partial<Problem>;
    title?: string;
    detail?: string;
    errors: {field: string; message: string}[];
    currentStatus?: Status;
    allowed?: Status[];
}

export declare class TaskManager {
    constructor(baseUrl?: string, options?: TaskManagerOptions);
    baseUrl: string;
    // The options given (TaskManagerOptions), or their defaults.
    apiKey: string | undefined;
    attempts: number;
    timeout: number;
    watchMode: 'stream' | 'poll';
    pollInterval: number;
    EventSource: (new (url: string) => EventSourceLike) | undefined;
    /** The Tasktrail-Read-After token of the last write, sent with the reads after it; `"primary"` after a write whose answer was lost. */
    readAfter: string | null;

    // The seed's calls: each resolves to the response's JSON, a Problem on a refusal.
    createTask(taskType: string, params?: Record<string, Json> | null, options?: {idempotencyKey?: string}): Promise<Task | Problem>;
    getTask(taskId: string): Promise<Task | Problem>;
    listTasks(filters?: ListFilters): Promise<Task[] | Problem>;
    updateTask(taskId: string, updates: TaskChanges, options?: {ifVersion?: number}): Promise<Task | Problem>;
    deleteTask(taskId: string): Promise<{status: 'deleted'} | Problem>;
    getStats(): Promise<Stats | Problem>;

    // Added: these reject with a TaskTrailError on a refusal.
    history(taskId: string, options?: {afterVersion?: number; limit?: number}): Promise<History>;
    events(options?: {after?: string; limit?: number}): Promise<FeedPage>;
    createMany(tasks: (NewTask | string)[], options?: {idempotencyKey?: string}): Promise<Task[]>;
    updateMany(updates: BatchUpdate[]): Promise<BatchResult[]>;
    cleanup(days?: number): Promise<number>;
    watchTask(taskId: string, onUpdate: (task: Task | null, event: FeedEvent | null) => void): Watch;
}

/** The name this module had before it was a package. */
export {TaskManager as TaskTrail};

export declare const EVENT_TYPES: EventType[];

/** The task after an event, as the server folds it; null once deleted. */
export declare function applyEvent(task: Task | null | undefined, event: FeedEvent): Task | null;
/** Of two Tasktrail-Read-After tokens, the later (compared as WAL positions when both are; else `token`). */
export declare function later(held: string | null | undefined, token: string): string;
