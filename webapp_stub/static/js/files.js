// A message's files (Slack's `files` array, from files.completeUploadExternal), shown as links.
// A click downloads with fetch and the token as Authorization: Bearer (as Slack's own client reads
// url_private), never a token in a URL, then saves the bytes from a blob: URL. Only this origin's
// /files-pri/ path of the URL is fetched: the token never goes to another host. Nothing is shown
// inline (the page's CSP stays as strict as it is: no blob: or data: for anything but what it was).
import { ApiError } from "./api.js";
import { h } from "./view.js";

const FILE_PATH = /^\/files-pri\/[A-Za-z0-9]+-F[0-9A-F]{16}\/download\/[A-Za-z0-9._-]+$/;

/** "12 KB"-style size. */
export function formatSize(bytes) {
  const n = Number(bytes) || 0;
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${Math.round(n / 1024)} KB`;
  return `${(n / (1024 * 1024)).toFixed(1)} MB`;
}

/** The same-origin path to fetch a file from, or null if its URL is not a file download of ours. */
export function downloadPath(file) {
  try {
    const path = new URL(String(file.url_private_download || "")).pathname;
    return FILE_PATH.test(path) ? path : null;
  } catch {
    return null;
  }
}

/** The elements for ``files``: a link (a button) per file, "This file was deleted." for a tombstone. */
export function fileList(files, onOpen) {
  return h(
    "div",
    { class: "files" },
    files.map((f) =>
      f.mode === "tombstone" || !downloadPath(f)
        ? h("span", { class: "file gone" }, "This file was deleted.")
        : h(
            "button",
            { class: "file", dataset: { file: f.id }, "aria-label": `Download ${f.name}`, onclick: () => onOpen(f) },
            `📎 ${f.title || f.name} (${formatSize(f.size)})`,
          ),
    ),
  );
}

/** Fetch the file with the token, then save it under its name. Rejects with an ApiError. */
export async function downloadFile(token, file) {
  const path = downloadPath(file);
  if (!path) throw new ApiError("file_not_found");
  let response;
  try {
    response = await fetch(path, { headers: { Authorization: `Bearer ${token}` }, credentials: "omit", cache: "no-store" });
  } catch {
    throw new ApiError("fleet_unreachable", { status: 0 });
  }
  if (!response.ok) {
    let code = "file_not_found";
    try {
      code = (await response.json()).error || code;
    } catch {
      // not our JSON: keep file_not_found
    }
    throw new ApiError(code, { status: response.status });
  }
  const url = URL.createObjectURL(await response.blob());
  const link = h("a", { href: url, download: String(file.name || "file"), hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}
