// Undo/redo of one workflow tab: snapshots of the workflow JSON (viewport excluded), one per
// user action. Output previews are not in the snapshots: they live in the tab's outputs map
// (tabs.js), so undoing an edit never empties a Save Image node.

export const UNDO_LIMIT = 100;

export class History {
  constructor(snapshot = null, limit = UNDO_LIMIT) {
    this.limit = limit;
    this.undoStack = snapshot === null ? [] : [snapshot];
    this.redoStack = [];
    this.saved = snapshot; // the snapshot last saved (or opened); null: never saved
  }

  get current() {
    return this.undoStack[this.undoStack.length - 1] ?? null;
  }

  get dirty() {
    return this.current !== this.saved;
  }

  reset(snapshot, saved = snapshot) {
    this.undoStack = [snapshot];
    this.redoStack = [];
    this.saved = saved;
  }

  /** Record ``snapshot`` as a new step; false when nothing changed. */
  push(snapshot) {
    if (snapshot === this.current) return false;
    this.undoStack.push(snapshot);
    if (this.undoStack.length > this.limit) this.undoStack.shift();
    this.redoStack = [];
    return true;
  }

  /** The snapshot to show after undoing one step, or null. */
  undo() {
    if (this.undoStack.length < 2) return null;
    this.redoStack.push(this.undoStack.pop());
    return this.current;
  }

  redo() {
    const snapshot = this.redoStack.pop();
    if (snapshot === undefined) return null;
    this.undoStack.push(snapshot);
    return snapshot;
  }

  markSaved(snapshot) {
    if (this.undoStack.length) this.undoStack[this.undoStack.length - 1] = snapshot;
    else this.undoStack.push(snapshot);
    this.saved = snapshot;
  }
}
