#if canImport(Glibc)
import Glibc
#endif
import WalshipFormat
import WalshipStorage
import WalshipSystem

/// Reads a restore's objects one after another on a thread of its own, ahead of the step that
/// applies them: it fetches each object (or takes the prefetched copy), checks its frame,
/// decrypts and decompresses it, and queues the payload. Apply and decompression then run on
/// two cores at once. The queue holds at most `capacity` bytes of payload.
///
/// Errors keep their place in the stream: a failure is queued after the payload read before
/// it, so the apply step meets it exactly where a single-threaded read would have, and never
/// meets it when it stops earlier (a target reached before a damaged tail).
final class ObjectReadAhead {
    struct Job {
        let key: String
        let kind: ObjectKind
        /// Where to read the object from; may wait (for a prefetched download) or throw.
        let source: () throws -> Replica
    }

    enum Item {
        case metadata(ObjectMetadata)
        case payload([UInt8])
        case end(ObjectMetadata)
        case failed(Error)
    }

    private let cond = MonotonicCondition()
    private var items: [Item?] = []
    private var head = 0
    private var queuedBytes = 0
    private var cancelled = false
    /// Payload buffers the apply step has finished with, for the reader to fill again (fresh
    /// allocations of this size are page-faulted in each time: a third of the work).
    private var spare: [[UInt8]] = []
    private var producerWaits = false
    private var consumerWaits = false
    private var thread: JoinableThread?
    private let capacity: Int
    private static let piece = 256 << 10

    init(jobs: [Job], encryption: EncryptionKey?, allowUnencrypted: Bool, capacity: Int = 4 << 20) throws {
        self.capacity = capacity
        thread = try JoinableThread { [self] in
            self.run(jobs, encryption: encryption, allowUnencrypted: allowUnencrypted)
        }
    }

    deinit { cancel() }

    private func run(_ jobs: [Job], encryption: EncryptionKey?, allowUnencrypted: Bool) {
        for job in jobs {
            var buffer: [UInt8] = []
            do {
                let source = try job.source()
                buffer = takeSpare()
                let meta = try streamObject(source, key: job.key, expect: job.kind, encryption: encryption,
                                            allowUnencrypted: allowUnencrypted, onMetadata: { m in try self.push(.metadata(m), bytes: 0) }) { chunk in
                    buffer.append(contentsOf: chunk)
                    if buffer.count >= Self.piece {
                        let full = buffer
                        buffer = self.takeSpare()
                        try self.push(.payload(full), bytes: full.count)
                    }
                }
                if isCancelled { return }
                if !buffer.isEmpty { try push(.payload(buffer), bytes: buffer.count) }
                try push(.end(meta), bytes: 0)
            } catch is StopStreaming {
                return
            } catch {
                // What was decoded before the failure goes first: a restore that stops before
                // the damage (a target inside a truncated segment) never meets the error.
                if !buffer.isEmpty { try? push(.payload(buffer), bytes: buffer.count, always: true) }
                try? push(.failed(error), bytes: 0, always: true)
                return
            }
        }
    }

    private var isCancelled: Bool { cond.locked { cancelled } }

    private func takeSpare() -> [UInt8] {
        var b = cond.locked { spare.popLast() } ?? []
        b.removeAll(keepingCapacity: true)
        b.reserveCapacity(Self.piece)
        return b
    }

    /// Hands a payload buffer back once its bytes are applied.
    func recycle(_ buffer: [UInt8]) {
        cond.locked { if spare.count < 24 { spare.append(buffer) } }
    }

    /// Queues an item, waiting while the queue is full; throws StopStreaming once cancelled.
    private func push(_ item: Item, bytes: Int, always: Bool = false) throws {
        try cond.locked {
            while !cancelled && !always && queuedBytes > 0 && queuedBytes + bytes > capacity {
                producerWaits = true
                cond.wait()
            }
            producerWaits = false
            if cancelled { throw StopStreaming() }
            items.append(item)
            queuedBytes += bytes
            if consumerWaits { cond.signal() }
        }
    }

    /// The next item, in stream order; waits for it.
    func next() -> Item {
        cond.locked {
            while head == items.count {
                consumerWaits = true
                cond.wait()
            }
            consumerWaits = false
            let item = items[head]!
            items[head] = nil   // the payload's storage goes now
            head += 1
            if case .payload(let b) = item { queuedBytes -= b.count }
            if head > 256 && head * 2 > items.count {
                items.removeFirst(head)
                head = 0
            }
            if producerWaits { cond.signal() }
            return item
        }
    }

    /// Stops the reader and waits for its thread. Items not taken are dropped.
    func cancel() {
        cond.locked {
            cancelled = true
            cond.signal()
        }
        thread?.join()
        thread = nil
    }
}
