// Minimal XML for S3's answers: the text of every element with a given tag, with the five
// predefined entities and numeric references decoded. S3 answers are untrusted input; this
// never builds a tree and never recurses.
public func xmlValues(_ body: [UInt8], _ tag: String) -> [String] {
    let open = Array("<\(tag)>".utf8), close = Array("</\(tag)>".utf8)
    func find(_ needle: [UInt8], from: Int) -> Int? {
        guard body.count >= needle.count else { return nil }
        var i = from
        while i + needle.count <= body.count {
            if body[i] == needle[0] && Array(body[i..<i + needle.count]) == needle { return i }
            i += 1
        }
        return nil
    }
    var out: [String] = []
    var pos = 0
    while let a = find(open, from: pos) {
        let start = a + open.count
        guard let b = find(close, from: start) else { break }
        out.append(xmlUnescape(String(decoding: body[start..<b], as: UTF8.self)))
        pos = b + close.count
    }
    return out
}

public func xmlValue(_ body: [UInt8], _ tag: String) -> String? { xmlValues(body, tag).first }

public func xmlUnescape(_ s: String) -> String {
    guard s.contains("&") else { return s }
    var out = ""
    var i = s.startIndex
    while i < s.endIndex {
        if s[i] == "&", let semi = s[i...].firstIndex(of: ";") {
            let entity = s[s.index(after: i)..<semi]
            var rep: String?
            switch entity {
            case "amp": rep = "&"
            case "lt": rep = "<"
            case "gt": rep = ">"
            case "quot": rep = "\""
            case "apos": rep = "'"
            default:
                if entity.hasPrefix("#x"), let v = UInt32(entity.dropFirst(2), radix: 16), let u = UnicodeScalar(v) { rep = String(Character(u)) }
                else if entity.hasPrefix("#"), let v = UInt32(entity.dropFirst()), let u = UnicodeScalar(v) { rep = String(Character(u)) }
            }
            if let r = rep { out += r; i = s.index(after: semi); continue }
        }
        out.append(s[i]); i = s.index(after: i)
    }
    return out
}

public func xmlEscape(_ s: String) -> String {
    var out = ""
    for c in s {
        switch c {
        case "&": out += "&amp;"
        case "<": out += "&lt;"
        case ">": out += "&gt;"
        default: out.append(c)      // quotes need no escaping in element text (ETags carry them)
        }
    }
    return out
}
